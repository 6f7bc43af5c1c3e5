"""Ray Train's ``TorchTrainer`` with two changes: errors a retry cannot fix are not retried, and SIGINT or
SIGTERM stop the run at once, so the command that started it can clean up and say so.

The one adapter to Ray Train's private API: every private name it uses is declared in :data:`SURFACE`, which
the test suite checks against the installed Ray (pinned in pyproject.toml), since no public hook does either.

Retries: in Ray 2.60's Train V2, ``DataParallelTrainer.fit`` hands the controller the policy
``create_failure_policy(run_config.failure_config)`` builds (``ray/train/v2/_internal/execution/
failure_handling/factory.py``), always a ``DefaultFailurePolicy`` (``.../failure_handling/default.py``),
whose ``_is_retryable_error`` treats every ``WorkerGroupError`` as retryable: a corrupt shard, a changed
model or a full disk is retried ``ray.max_failures`` times and ends in a ``WorkerGroupError``. The
controller asks its policy's ``make_decision(training_failed_error)`` for ``RETRY`` or ``RAISE``;
:class:`PermanentErrorPolicy` answers ``RAISE`` when any worker's own exception
(``WorkerGroupError.worker_failures``, the unwrapped exception of each failed rank) is one
:func:`loomcfm_core.errors.retry_can_fix` says a retry cannot cure, and leaves every other decision to
Ray's default. :class:`LoomcfmTrainer` passes it in through ``_initialize_and_run_controller``, the one
place ``fit`` assembles the controller's arguments.

Worker logs: Ray Train logs every exception of the training function with its traceback
(``construct_user_exception_with_traceback`` in ``ray/train/v2/_internal/util.py``, logger
``ray.train.v2._internal.util``, called inside ``ThreadRunner._run_target``'s ``except``). For an error whose
message is meant for the user (ours, or the machine's: a full disk) :func:`quiet_user_errors` makes that
record one line; the driver ends with the same message (:func:`worker_error`). Other errors keep their traceback.

Signals: ``DataParallelTrainer._register_sigint_handler`` installs a SIGINT handler that asks the
controller to abort and lets ``fit`` return as if training ended; here SIGINT and SIGTERM also abort the
controller, then raise ``KeyboardInterrupt`` so the caller knows the run was stopped (its MLflow run ends
KILLED, its local Ray is shut down, its lease released).
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.execution.failure_handling import FailureDecision
from ray.train.v2._internal.execution.failure_handling.default import DefaultFailurePolicy
from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError

from loomcfm_core.errors import LoomcfmError, TrainingError, retry_can_fix
from loomcfm_core.private_api import PrivateSurface
from loomcfm_core.processes import stop_on_signal

if TYPE_CHECKING:
    from loomcfm_core.config import RayConfig

_TRAIN = "ray.train.v2._internal.execution"
_USER_ERRORS = "ray.train.v2._internal.util"  # the module (and logger) that logs a training function's error
_TOKEN_SETUP = "ray._private.authentication.authentication_token_setup"
SURFACE = PrivateSurface("ray", "2.60.*", names=(
    f"{_TOKEN_SETUP}._warn_token_auth_enabled", f"{_TOKEN_SETUP}.logger",
    f"{_TRAIN}.failure_handling.FailureDecision.RAISE",
    f"{_TRAIN}.controller.controller.TrainController.abort",
    f"{_USER_ERRORS}.construct_user_exception_with_traceback", f"{_USER_ERRORS}.logger",
), parameters={
    f"{_TRAIN}.failure_handling.default.DefaultFailurePolicy": ("failure_config",),
    f"{_TRAIN}.failure_handling.default.DefaultFailurePolicy.make_decision": ("training_failed_error",),
    "ray.train.v2.api.data_parallel_trainer.DataParallelTrainer._initialize_and_run_controller":
        ("controller_init_kwargs",),
    "ray.train.v2.api.data_parallel_trainer.DataParallelTrainer._register_sigint_handler": ("controller",),
    f"{_TRAIN}.controller.controller.TrainController": ("failure_policy",),
})
log = logging.getLogger(__name__)


class _TokenNotice(logging.Filter):
    """Drops Ray's warning that it turned token authentication on for a new local Ray (``_warn_token_auth_
    enabled``, through its module's ``logger``): the secure default, nothing to act on. Setting
    ``RAY_AUTH_MODE=token`` instead does not work once ``ray`` is imported (its config is read then, and the
    GCS would look for a token never written)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


_TOKEN_NOTICE = _TokenNotice()


def quiet_token_notice() -> None:
    """Filter :class:`_TokenNotice` at Ray's logger (once: ``addFilter`` skips a filter already there)."""
    logging.getLogger(_TOKEN_SETUP).addFilter(_TOKEN_NOTICE)


def shown_as_is(error: BaseException | None) -> bool:
    """Whether a worker's error is shown to the user as it is (its message names what is wrong): ours, or
    the machine's (a full disk, a permission)."""
    return isinstance(error, (LoomcfmError, OSError))


class _OneLineUserErrors(logging.Filter):
    """Makes Ray Train's "Error in training function" record one line for an error :func:`shown_as_is`."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = sys.exc_info()[1]  # the record is made inside the except block that caught it, in its thread
        if shown_as_is(error) and str(record.msg).startswith("Error in training function"):
            record.msg, record.args = f"Error in training function: {type(error).__name__}: {error}", ()
        return True


def quiet_user_errors() -> None:
    """In a Ray Train worker: log an error meant for the user without the traceback (see the module doc)."""
    logging.getLogger(_USER_ERRORS).addFilter(_OneLineUserErrors())


class PermanentErrorPolicy(DefaultFailurePolicy):
    """Ray's default policy, except that a worker error no retry can fix ends the run at once."""

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        if isinstance(training_failed_error, WorkerGroupError):
            permanent = {rank: error for rank, error in training_failed_error.worker_failures.items()
                         if not retry_can_fix(error)}
            if permanent:
                rank, error = min(permanent.items())
                log.info("not retrying: rank %d failed with %s, which a retry cannot fix", rank,
                         type(error).__name__)
                return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class LoomcfmTrainer(TorchTrainer):
    """A ``TorchTrainer`` with :class:`PermanentErrorPolicy` and stop-at-once signal handling."""

    @classmethod
    def of(cls, settings: RayConfig, name: str, worker: Callable[[dict], None], loop_config: dict) -> LoomcfmTrainer:
        """``worker(loop_config)`` on ``ray.num_workers`` workers (a GPU each with ``ray.use_gpu``: NCCL, else
        gloo), ``ray.max_failures`` worker-group restarts, named ``name`` (the run folder's)."""
        return cls(worker, train_loop_config=loop_config,
                   torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
                   scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                                resources_per_worker={"CPU": settings.cpus_per_worker}),
                   run_config=RunConfig(name=name, failure_config=FailureConfig(max_failures=settings.max_failures)))

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = PermanentErrorPolicy(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)

    def _register_sigint_handler(self, controller) -> None:
        def stop(signum, frame) -> None:
            try:
                controller.abort.remote()  # fire and forget: the workers stop while this process cleans up
            except Exception as exc:  # noqa: BLE001 - Ray may be going down already; stopping is what matters
                log.warning("could not ask Ray Train's controller to abort: %s", exc)
            stop_on_signal(signum, frame)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)


def worker_error(exc: TrainingFailedError) -> Exception:
    """The error to show for a failed run: the first rank's own error when it is ours or the machine's (its
    message is meant for the user), else a :class:`TrainingError` with its first line (the workers'
    tracebacks are in the log above it)."""
    failures = getattr(exc, "worker_failures", None)
    if not failures:
        cause = getattr(exc, "controller_failure", exc)
        return TrainingError(f"Ray Train failed: {type(cause).__name__}: {str(cause).strip().splitlines()[0]}")
    for _, error in sorted(failures.items()):
        if shown_as_is(error):
            return error
    rank, error = min(failures.items())
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return TrainingError(f"training failed on rank {rank}: {type(error).__name__}: {first} (the worker's "
                         "traceback is in the log above)")
