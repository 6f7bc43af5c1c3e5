"""Ray Train (a real local Ray) retries what a retry may fix and nothing else, and the driver shows one error."""

from __future__ import annotations

import errno

import pytest
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.v2.api.exceptions import TrainingFailedError

from loomcfm_core.errors import SourceError, StorageUnavailable, TrainingError
from loomcfm_core.training.ray_trainer import LoomcfmTrainer, quiet_user_errors, worker_error


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=1, logging_level="WARNING", include_dashboard=False)
    yield
    ray.shutdown()


def _attempts(tmp_path, error: Exception) -> tuple[int, Exception]:
    """Run a one-worker training that fails with ``error`` under max_failures=1; returns how many times the
    worker ran (1, or 2 when the failure was retried) and the error the driver shows."""
    counter = tmp_path / "attempts"

    def train(config: dict) -> None:  # a closure: pickled by value, nothing to import on the worker
        with open(config["counter"], "a") as fh:
            fh.write("x")
        raise config["error"]

    trainer = LoomcfmTrainer(train, train_loop_config={"counter": str(counter), "error": error},
                             scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                             run_config=RunConfig(name=tmp_path.name, storage_path=str(tmp_path / "ray"),
                                                  failure_config=FailureConfig(max_failures=1)))
    with pytest.raises(TrainingFailedError) as info:
        trainer.fit()
    return len(counter.read_text()), worker_error(info.value)


@pytest.mark.ray
def test_errors_a_retry_cannot_fix_are_not_retried(tmp_path, local_ray):
    attempts, shown = _attempts(tmp_path, SourceError("/data/x.png: cannot decode image"))
    assert attempts == 1
    assert isinstance(shown, SourceError) and str(shown) == "/data/x.png: cannot decode image"


@pytest.mark.ray
def test_a_full_disk_is_not_retried(tmp_path, local_ray):
    attempts, shown = _attempts(tmp_path, OSError(errno.ENOSPC, "No space left on device"))
    assert attempts == 1 and isinstance(shown, OSError) and shown.errno == errno.ENOSPC


@pytest.mark.ray
def test_other_errors_are_retried_max_failures_times(tmp_path, local_ray):
    attempts, shown = _attempts(tmp_path, RuntimeError("NCCL watchdog timeout\nmore detail"))
    assert attempts == 2
    assert isinstance(shown, TrainingError)
    assert str(shown) == ("training failed on rank 0: RuntimeError: NCCL watchdog timeout (the worker's traceback is "
                          "in the log above)")
    attempts, shown = _attempts(tmp_path / "b", StorageUnavailable("s3://b/x: S3 request failed after 8 attempts"))
    assert attempts == 2 and isinstance(shown, StorageUnavailable), "an unreachable store may come back"


def test_a_worker_logs_an_error_meant_for_the_user_in_one_line(caplog):
    """Ray's own logging of a failed training function (``construct_user_exception_with_traceback``, what
    ``ThreadRunner._run_target`` calls in its ``except``): one line for ours, the traceback for the rest."""
    from ray.train.v2._internal.util import construct_user_exception_with_traceback

    quiet_user_errors()
    for error in (SourceError("/data/x.png: cannot decode image"), OSError(errno.ENOSPC, "No space left on device"),
                  RuntimeError("NCCL watchdog timeout")):
        try:
            raise error
        except BaseException as exc:  # noqa: BLE001 - as Ray's runner catches it
            construct_user_exception_with_traceback(exc)
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Error in training function")]
    assert messages[:2] == ["Error in training function: SourceError: /data/x.png: cannot decode image",
                            "Error in training function: OSError: [Errno 28] No space left on device"]
    assert "Traceback" in messages[2] and "NCCL watchdog timeout" in messages[2]
