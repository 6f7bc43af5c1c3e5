"""LOOM-CFM training, one concern a module.

``step`` (EMA, state, one optimisation step, warm-up), ``sampler`` (the global batch order), ``loop`` (``fit``:
the resumable loop of one rank, with its checkpoints), ``tracker`` (rank 0's MLflow logging), ``summary``
(``result.json``, what a finished run commits), ``distributed`` (the collectives, identities without a process
group), ``preflight`` (the driver's checks before any worker starts, and what a resume may change),
``ray_trainer`` (Ray Train's trainer with a failure policy that does not retry what a retry cannot fix),
``local_ray`` (the local Ray a command starts, recorded and never left behind) and ``launch`` (``run_on_ray``:
``fit`` on every worker of a Ray Train ``TorchTrainer``).
"""
