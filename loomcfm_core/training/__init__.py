"""LOOM-CFM training, one concern a module.

``step`` (EMA, state, one optimisation step, warm-up), ``sampler`` (the global batch order), ``loop`` (``fit``:
the resumable loop of one rank, with its checkpoints), ``tracker`` (rank 0's MLflow logging), ``result``
(``result.json``, what a finished run commits, and the registration beside it), ``distributed`` (the
collectives, identities without a process group), ``preflight`` (the driver's checks before any worker starts,
and what a resume may change), ``ray_trainer`` (Ray Train's trainer with a failure policy that does not retry
what a retry cannot fix: the one adapter to Ray Train's private API), ``local_ray`` (the Ray a command joins,
or starts for itself, recorded and never left behind) and ``driver`` (``run_on_ray``: ``fit`` on every worker
of a Ray Train ``TorchTrainer``, wherever a launcher runs it). ``converge`` and ``pipelined`` are LOOM's
reassignment before training and ahead of the step.
"""
