"""LOOM-CFM training, one concern a module.

``step`` (EMA, state, one optimisation step, warm-up), ``sampler`` (the global batch order), ``loop`` (``fit``:
the resumable loop of one rank, with its checkpoints), ``tracker`` (rank 0's MLflow logging), ``summary``
(``result.json``, what a finished run commits), ``distributed`` (the collectives, identities without a process
group) and ``launch`` (``run_on_ray``: ``fit`` on every worker of a Ray Train ``TorchTrainer``).
"""
