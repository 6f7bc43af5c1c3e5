"""Training on real Ray Train (local cluster, CPU workers): identical LOOM tables across ranks, exact resume
after a kill."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from loomcfm_core.checkpoint import list_checkpoints, load_checkpoint
from loomcfm_core.config import load_config
from loomcfm_core.lease import LEASE_FILE
from loomcfm_core.processes import Holder
from loomcfm_core.training.loop import fit
from tests.run_cli import call, error_line, sets, start, wait_for
from tests.training import TINY


def _cli(tmp_path, *overrides, **popen):
    args = [sys.executable, "-m", "loomcfm_core.cli", "train"]
    for item in (*TINY, f"storage.root={tmp_path / 'store'}", f"tracking.local_dir={tmp_path / 'runs'}", *overrides):
        args += ["--set", item]
    tmp_path.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-5000:]
    return json.loads(out[out.rindex("\n{") + 1:])


@pytest.mark.ray
def test_two_ray_workers_keep_identical_tables_and_loss_falls(tmp_path, store):
    """Two Ray Train workers: identical LOOM tables, a falling loss, and the evaluation during training done
    together (each samples its share of the seeds, rank 0 scores)."""
    summary = _finish(_cli(tmp_path, "ray.num_workers=2", "train.max_steps=40", "train.lr=2e-3",
                           "eval.every_steps=20", "eval.during_training.num_samples=64"))
    hashes = summary["table_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1] != "-"
    ckpt = load_checkpoint(summary["checkpoint_uri"])
    assert ckpt["step"] == 40 and len(ckpt["rng"]) == 2
    # the coupling really worked across ranks: assignments changed and lowered the cost
    metrics = summary["metrics"]
    assert metrics["coupling/swaps"] > 0 and metrics["coupling/cost_after"] < metrics["coupling/cost_before"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    history = [m.value for m in client.get_metric_history(summary["mlflow_run_id"], "train/loss")]
    assert len(history) == 8 and history[-1] < 0.8 * history[0], history
    scored = client.get_metric_history(summary["mlflow_run_id"], "during_training/fd_digits/euler-2")
    assert [m.step for m in scored] == [20, 40] and all(m.value > 0 for m in scored)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["coupling.kind"] == "loom"
    assert run.data.tags["loomcfm.latest_checkpoint"] == summary["checkpoint_uri"]
    assert {"coupling/cost_before", "coupling/cost_after", "coupling/swaps", "throughput/images_per_s",
            "train/lr"} <= set(run.data.metrics)


@pytest.mark.ray
def test_a_killed_training_is_taken_over_and_resumes_exactly(tmp_path, store, capfd):
    """``kill -9`` of a local training (its driver, local Ray and worker) after a checkpoint. While it runs, a
    second training of the folder is refused naming it; after the kill, the next one cleans up the Ray
    processes the killed one left, takes the lease over, resumes from the latest checkpoint and ends with
    exactly the weights and LOOM table of an uninterrupted run (trained here in-process on one thread, as the
    Ray worker with its one CPU trains)."""
    common = [*TINY, "train.max_steps=150", "train.checkpoint_every=10", "train.keep_checkpoints=2",
              "train.run_name=shared", f"storage.root={store}", f"tracking.local_dir={tmp_path / 'runs'}",
              f"data.local_cache={tmp_path / 'node'}"]
    run_uri = store / "runs" / "shared"
    first = start("train", *sets(*common), cwd=tmp_path)
    wait_for(lambda: list_checkpoints(str(run_uri)), first, timeout=300, what="the first checkpoint")
    assert json.loads((run_uri / LEASE_FILE).read_text())["holder"]["pid"] == first.pid

    second = call("train", *sets(*common))
    assert second.returncode == 1 and f"is being trained by pid {first.pid} on " in error_line(second)

    record = json.loads((tmp_path / "home" / ".cache" / "loomcfm" / "ray" / f"{first.pid}.json").read_text())
    os.kill(first.pid, signal.SIGKILL)  # the driver: Ray stops its job's worker soon after, its agents never
    first.proc.wait()
    killed_at = list_checkpoints(str(run_uri))[-1][0]
    time.sleep(2)
    orphans = [Holder.from_dict(p) for p in record["processes"] if Holder.from_dict(p).alive()]
    assert orphans, "kill -9 of the driver leaves Ray's agents running (what the next training cleans up)"

    third = call("train", *sets(*common))
    assert third.returncode == 0, third.stderr[-4000:]
    assert f"took over the lease of pid {first.pid}" in third.stderr
    assert re.search(rf"killed \d+ Ray processes left behind by pid {first.pid} on .* \(which is gone\)", third.stderr)
    assert not [p for p in orphans if p.alive()], "the new training killed what the killed one left"
    resumed_at = int(re.search(r"resumed from .*step-(\d+)\.pt", third.stderr).group(1))
    assert resumed_at >= killed_at  # the killed driver's worker may write one more before it is fenced off
    resumed = json.loads(third.stdout[third.stdout.index("{"):])
    assert 10 <= resumed_at < 150 and resumed["step"] == 150 and not (run_uri / LEASE_FILE).exists()
    assert [s for s, _ in list_checkpoints(str(run_uri))] == [140, 150], "only the last k checkpoints are kept"

    cfg = load_config("digits", [*common, f"storage.root={tmp_path / 'straight'}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = fit(cfg, resumed["dataset_uri"], str(tmp_path / "straight" / "runs" / "s"), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    a, b = load_checkpoint(straight.checkpoint_uri), load_checkpoint(resumed["checkpoint_uri"])
    assert torch.equal(a["coupling"]["table"], b["coupling"]["table"])
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=0, atol=1e-6)
        torch.testing.assert_close(b["ema"][key], a["ema"][key], rtol=0, atol=1e-6)


def test_a_bucket_that_refuses_to_list_unfinished_uploads_leaves_them_to_its_lifecycle_rule(caplog, monkeypatch):
    """The housekeeping under the lease is best effort: a policy without ``s3:ListBucketMultipartUploads``
    (common in least-privilege buckets) gets one warning naming the way out, and the training goes on."""
    from loomcfm_core.errors import StorageError
    from loomcfm_core.training import driver

    class Refusing:
        def abort_uploads(self, uri):
            raise StorageError(f"{uri}: S3 refused the credentials (AccessDenied); check ...")

    monkeypatch.setattr(driver, "storage_for", lambda uri: Refusing())
    driver._abort_unfinished_uploads("s3://b/runs/r")
    (record,) = [r for r in caplog.records if r.name == driver.__name__]
    assert record.levelname == "WARNING" and "s3://b/runs/r/checkpoints" in record.getMessage()
    assert "AccessDenied" in record.getMessage() and "lifecycle rule" in record.getMessage()
