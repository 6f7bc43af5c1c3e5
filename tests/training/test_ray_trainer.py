"""Ray Train (a real local Ray) retries what a retry may fix and nothing else, and the driver shows one error."""

from __future__ import annotations

import errno

import pytest
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.v2.api.exceptions import TrainingFailedError

from loomcfm_core.errors import SourceError, StorageUnavailable, TrainingError
from loomcfm_core.training.ray_trainer import LoomcfmTrainer, worker_error


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=1, logging_level="WARNING", include_dashboard=False)
    yield
    ray.shutdown()


def _attempts(tmp_path, error: Exception) -> tuple[int, Exception]:
    """Run a one-worker training that fails with ``error`` under max_failures=2; returns how many times the
    worker ran and the error the driver shows."""
    counter = tmp_path / "attempts"

    def train(config: dict) -> None:  # a closure: pickled by value, nothing to import on the worker
        with open(config["counter"], "a") as fh:
            fh.write("x")
        raise config["error"]

    trainer = LoomcfmTrainer(train, train_loop_config={"counter": str(counter), "error": error},
                             scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                             run_config=RunConfig(name=tmp_path.name, storage_path=str(tmp_path / "ray"),
                                                  failure_config=FailureConfig(max_failures=2)))
    with pytest.raises(TrainingFailedError) as info:
        trainer.fit()
    return len(counter.read_text()), worker_error(info.value)


def test_errors_a_retry_cannot_fix_are_not_retried(tmp_path, local_ray):
    attempts, shown = _attempts(tmp_path, SourceError("/data/x.png: cannot decode image"))
    assert attempts == 1
    assert isinstance(shown, SourceError) and str(shown) == "/data/x.png: cannot decode image"


def test_a_full_disk_is_not_retried(tmp_path, local_ray):
    attempts, shown = _attempts(tmp_path, OSError(errno.ENOSPC, "No space left on device"))
    assert attempts == 1 and isinstance(shown, OSError) and shown.errno == errno.ENOSPC


def test_other_errors_are_retried_max_failures_times(tmp_path, local_ray):
    attempts, shown = _attempts(tmp_path, RuntimeError("NCCL watchdog timeout\nmore detail"))
    assert attempts == 3
    assert isinstance(shown, TrainingError)
    assert str(shown) == ("training failed on rank 0: RuntimeError: NCCL watchdog timeout (the worker's traceback is "
                          "in the log above)")
    attempts, shown = _attempts(tmp_path / "b", StorageUnavailable("s3://b/x: S3 request failed after 8 attempts"))
    assert attempts == 3 and isinstance(shown, StorageUnavailable), "an unreachable store may come back"
