"""MLflow's stack of active runs, the one private part of MLflow we rely on (:data:`SURFACE`).

A Ray worker logs into the MLflow run its driver holds (``tracking.start_run(..., attach=True)``) and must
leave it without ending it: MLflow's ``ActiveRun.__exit__`` ends the active run FINISHED, or FAILED on any
exception, and Ray stops a worker with SIGTERM (``SystemExit``) right after its driver ended the run KILLED,
which the worker would overwrite. MLflow has no public call that only takes a run off this process's stack
(``mlflow/tracking/fluent.py``: ``end_run`` pops it the same way before ``set_terminated``).
"""

from __future__ import annotations

import mlflow

from loomcfm_core.private_api import PrivateSurface

SURFACE = PrivateSurface("mlflow", "3.17.*", names=("mlflow.tracking.fluent._active_run_stack.get",))


def leave(run: mlflow.ActiveRun) -> None:
    """Stop logging into ``run`` without ending it: the run is taken off this process's stack of active runs,
    which makes ``__exit__`` leave it alone. The process that holds the run alone decides how it ends."""
    stack = mlflow.tracking.fluent._active_run_stack.get()
    if stack and stack[-1].info.run_id == run.info.run_id:
        stack.pop()
