"""MLflow statuses that say what happened to a stage: SIGTERM ends it KILLED, a stage killed outright is
marked FAILED by the next one, and the parent (pipeline) run takes the status of a failed child."""

from __future__ import annotations

import os
import signal

import pytest
from mlflow.tracking import MlflowClient

from loomcfm_core import stages
from loomcfm_core.config import load_config
from loomcfm_core.layout import holders_uri
from loomcfm_core.run_status import read_holder
from tests.conftest import SMALL
from tests.run_cli import call, error_line, sets, start, wait_for


@pytest.fixture()
def setup(tmp_path, checkpoint):
    """A config tracking under tmp_path, its cached dataset (with the classifier evaluation scores with), and
    a pipeline parent run opened as KFP's prepare step opens it (then closed: the steps run elsewhere)."""
    overrides = [*SMALL, f"storage.root={tmp_path}/store", f"tracking.local_dir={tmp_path}/runs"]
    cfg = load_config("digits", overrides)
    dataset = stages.cache(cfg).dataset_uri
    parent = stages.start_pipeline_run(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    return cfg, overrides, dataset, parent, client


def _slow_evaluation(tmp_path, checkpoint, dataset, parent, overrides):
    """An evaluation that runs for minutes (adaptive solver, many samples), under the parent run."""
    return start("evaluate", "--ckpt", checkpoint, "--dataset", dataset, "--methods", "dopri5-1",
                 "--parent-run-id", parent, *sets(*overrides, "eval.num_samples=200000", "eval.batch_size=50"),
                 cwd=tmp_path)


def _stage_runs(client, cfg, stage, status=None):
    experiment = client.get_experiment_by_name(f"loomcfm-{cfg.name}").experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`loomcfm.stage` = '{stage}'"
                              + (f" and attributes.status = '{status}'" if status else ""))


@pytest.mark.process
def test_sigterm_ends_the_stage_and_its_parent_killed(tmp_path, checkpoint, setup):
    cfg, overrides, dataset, parent, client = setup
    proc = _slow_evaluation(tmp_path, checkpoint, dataset, parent, overrides)
    wait_for(lambda: _stage_runs(client, cfg, "evaluate", "RUNNING"), proc, what="the running evaluate run")
    os.kill(proc.pid, signal.SIGTERM)
    stopped = proc.finish(timeout=300)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert stopped.stderr.rstrip().endswith("loomcfm: stopped by SIGTERM"), stopped.stderr[-3000:]
    (evaluate,) = _stage_runs(client, cfg, "evaluate")
    assert evaluate.info.status == "KILLED" and evaluate.data.tags["loomcfm.ended_by"] == "stopped by SIGTERM"
    assert client.get_run(parent).info.status == "KILLED", "the parent shows that its pipeline did not finish"


@pytest.mark.process
def test_a_stage_killed_outright_is_marked_failed_by_the_next(tmp_path, checkpoint, setup):
    cfg, overrides, dataset, parent, client = setup
    proc = _slow_evaluation(tmp_path, checkpoint, dataset, parent, overrides)
    wait_for(lambda: _stage_runs(client, cfg, "evaluate", "RUNNING"), proc, what="the running evaluate run")
    os.kill(proc.pid, signal.SIGKILL)
    proc.proc.wait()
    (dead,) = _stage_runs(client, cfg, "evaluate")
    assert dead.info.status == "RUNNING", "nobody was left to say otherwise"
    assert not any(key.startswith(("loomcfm.holder", "loomcfm.heartbeat")) for key in dead.data.tags), \
        "who holds a run is bookkeeping beside the data, not in MLflow"
    holder, _ = read_holder(holders_uri(cfg), dead.info.run_id)
    assert holder.pid == proc.pid

    again = call("cache", *sets(*overrides))
    assert again.returncode == 0, again.stderr[-3000:]
    dead = client.get_run(dead.info.run_id)
    assert dead.info.status == "FAILED"
    assert dead.data.tags["loomcfm.ended_by"].endswith(f"its process ({holder}) was gone")
    assert read_holder(holders_uri(cfg), dead.info.run_id) is None, "the record went with the run it held"
    assert client.get_run(parent).info.status == "FAILED"
    assert f"MLflow run {dead.info.run_id} (evaluate) was left RUNNING by pid {proc.pid}" in again.stderr


def test_a_failed_stage_fails_its_parent(tmp_path, setup):
    cfg, overrides, _, parent, client = setup
    proc = call("evaluate", "--ckpt", str(tmp_path / "store" / "runs" / "s" / "checkpoints" / "step-00000003.pt"),
                "--dataset", str(tmp_path / "nowhere"), "--parent-run-id", parent, *sets(*overrides))
    assert proc.returncode == 1 and "nowhere/classifier.pt not found" in error_line(proc)
    (failed,) = _stage_runs(client, cfg, "evaluate")
    assert failed.info.status == "FAILED" and client.get_run(parent).info.status == "FAILED"
