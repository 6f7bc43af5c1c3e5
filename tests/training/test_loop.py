"""The training loop of one rank without Ray, and the summary it commits."""

import json

import torch
from mlflow.tracking import MlflowClient

from loomcfm_core import tracking
from loomcfm_core.config import load_config
from loomcfm_core.data.cache import cache_dataset
from loomcfm_core.training.loop import fit
from loomcfm_core.training.result import TrainResult, read_result
from tests.training import TINY


def test_fit_without_ray_logs_to_parent_run(tmp_path):
    cfg = load_config("digits", TINY + ["train.max_steps=6", f"storage.root={tmp_path}/store",
                                        f"tracking.local_dir={tmp_path}/runs", "coupling.kind=minibatch_ot"])
    uri = cache_dataset(cfg).uri
    with tracking.start_run(cfg.tracking, cfg.experiment, "pipeline") as parent:
        summary = fit(cfg, uri, f"{tmp_path}/store/runs/x", torch.device("cpu"), parent_run_id=parent.info.run_id)
    run = MlflowClient(tracking.tracking_uri(cfg.tracking)).get_run(summary.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert summary.table_hashes == ["-"] and summary.metrics["coupling/swaps"] > 0


def test_fit_commits_its_summary_to_result_json(tmp_path):
    cfg = load_config("digits", TINY + ["train.max_steps=5", f"storage.root={tmp_path}/store",
                                        f"tracking.local_dir={tmp_path}/runs", "train.checkpoint_every=2"])
    uri = cache_dataset(cfg).uri
    run_uri = f"{tmp_path}/store/runs/y"
    summary = fit(cfg, uri, run_uri, torch.device("cpu"))
    assert read_result(run_uri) == summary
    assert (summary.run_uri, summary.dataset_uri, summary.step) == (run_uri, uri, 5)
    assert summary.checkpoint_uri == f"{run_uri}/checkpoints/step-00000005.pt"
    assert len(summary.table_hashes) == 1 and summary.table_hashes[0] != "-", "a LOOM table"
    assert set(summary.metrics) >= {"train/loss", "coupling/swaps", "train/lr"}


def test_result_json_round_trip(tmp_path):
    summary = TrainResult(run_uri=str(tmp_path), dataset_uri="s3://b/d", step=3, checkpoint_uri="c",
                          mlflow_run_id=None, table_hashes=["ab", "ab"], metrics={"train/loss": 0.25})
    assert TrainResult.from_json(summary.to_json()) == summary
    assert json.loads(summary.to_json())["metrics"] == {"train/loss": 0.25}
