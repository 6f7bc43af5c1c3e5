"""`loomcfm run` end to end on a small digits budget: every stage, and what MLflow holds afterwards."""

import json
import re
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from loomcfm_core.config import load_config
from loomcfm_core.data.dataset import ShardedDataset
from loomcfm_core.evaluation.metrics import FeatureStats, dataset_images, frechet_distance, reference_stats
from loomcfm_core.evaluation.samples import feature_network
from tests.run_cli import call, inside, sets

pytestmark = pytest.mark.ray

SMALL = ["train.max_steps=150", "reflow.max_steps=60", "reflow.num_pairs=512", "eval.num_samples=400",
         "eval.methods=[euler-1,euler-4,euler-8]", "ray.cpus_per_worker=1", "train.checkpoint_every=100"]


def run_pipeline(root, *args) -> str:
    """``loomcfm run *args`` in ``root`` (this process, ``tests.run_cli.call``), its store and MLflow under it;
    returns its output, and leaves what it wrote to stderr in ``root/stderr.txt``."""
    with inside(root):
        proc = call("run", *args, *sets(f"storage.root={root}/store", f"tracking.local_dir={root}/runs"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (root / "stderr.txt").write_text(proc.stderr)
    return proc.stdout


def pipeline_runs(root, experiment="loomcfm-digits"):
    """The MLflow client of a ``run_pipeline`` store and the runs of its experiment."""
    client = MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, digits_dataset):
    root = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(digits_dataset, root / "store" / "datasets" / digits_dataset.name)  # its cache: found
    return root, run_pipeline(root, *sets(*SMALL))


def test_run_prints_the_summary_and_the_mlflow_command(pipeline):
    root, out = pipeline
    assert "| method | NFE base | fd_digits base | NFE reflow | fd_digits reflow |" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{root / 'runs' / 'mlflow.db'}" in out
    client, runs = pipeline_runs(root)
    (parent,) = [r for r in runs if r.data.tags.get("loomcfm.stage") == "pipeline"]
    recorded = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="summary.md",
                                                        tracking_uri=client.tracking_uri)).read_text()
    assert recorded.strip() in out, "the parent run holds the table the command printed"
    assert len(recorded.strip().splitlines()) == 2 + 3, "a row per method"


# a line that looks like a failure: a log record at warning level or above (Python's logging, Ray's and
# Ray's C++ "[<time> E <pid> <tid>] file.cc:N" lines), a Python warning, a traceback
ALARMING = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|\d [EWF] \d+ \d+\] \w+\.cc:|\w+Warning:|Traceback")


def test_a_successful_run_prints_nothing_alarming(pipeline):
    """Progress bars, our results and nothing that looks like a failure: no Ray token-authentication warning,
    no error-level core_worker.cc line about Ray Train's preemption watcher, no MLflow CloudPickle warning."""
    root, out = pipeline
    lines = [line for text in (out, (root / "stderr.txt").read_text()) for line in re.split(r"[\r\n]", text)]
    assert not [line for line in lines if ALARMING.search(line)]
    assert "(sample grids, the plot and results.json: " in out and "Sample grids and FD-vs-NFE plots:" in out
    assert "vs NFE of the reflowed model" in out


def test_the_parent_run_carries_the_summary_metrics(pipeline):
    root, _ = pipeline
    client, runs = pipeline_runs(root)
    (parent,) = [r for r in runs if r.data.tags.get("loomcfm.stage") == "pipeline"]
    evals = {r.data.tags["loomcfm.stage"]: r.data.metrics for r in runs
             if r.data.tags.get("loomcfm.stage", "").startswith("evaluate")}
    for model, stage in (("base", "evaluate"), ("reflow", "evaluate_reflow")):
        for method in ("euler-1", "euler-4", "euler-8"):
            assert parent.data.metrics[f"{model}/fd_digits/{method}"] == evals[stage][f"fd_digits/{method}"]
            assert parent.data.metrics[f"{model}/nfe/{method}"] == evals[stage][f"nfe/{method}"]


def test_mlflow_holds_parent_stages_metrics_pictures_and_models(pipeline):
    root, _ = pipeline
    client, runs = pipeline_runs(root)
    parent = [r for r in runs if r.data.tags.get("loomcfm.stage") == "pipeline"]
    assert len(parent) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    stages = sorted(r.data.tags["loomcfm.stage"] for r in children)
    assert stages == ["cache", "evaluate", "evaluate_reflow", "pairs", "train", "train_reflow"]
    assert sorted(r.info.run_name for r in children) == stages, "children are told apart by name"
    assert all(r.info.status == "FINISHED" for r in [*parent, *children])
    for run in children:
        if run.data.tags["loomcfm.stage"].startswith("train"):
            assert {"train/loss", "coupling/cost_before", "coupling/swaps"} <= set(run.data.metrics)
        if run.data.tags["loomcfm.stage"].startswith("evaluate"):
            assert {"fd_digits/euler-1", "nfe/euler-1", "fd_digits/euler-8"} <= set(run.data.metrics)
            files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "eval")}
            assert {"samples_euler-1.png", "samples_euler-8.png", "fd_vs_nfe.png", "results.json"} <= files
            grid = Image.open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                  artifact_path="eval/samples_euler-1.png",
                                                                  tracking_uri=client.tracking_uri))
            assert grid.size == (8 * 66 + 2, 8 * 66 + 2), "each 8x8 digit shown at 64x64"
    assert {"fd_vs_nfe.png", "summary.md", "config.yaml"} <= {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    model = client.get_registered_model("loomcfm-digits")
    assert set(model.aliases) == {"base", "reflow"}
    trains = {r.data.params["coupling.kind"]: r.info.run_id for r in children
              if r.data.tags["loomcfm.stage"].startswith("train")}
    assert client.get_model_version_by_alias("loomcfm-digits", "base").run_id == trains["loom"]
    assert client.get_model_version_by_alias("loomcfm-digits", "reflow").run_id == trains["pairs"]
    for alias in ("base", "reflow"):  # the evaluation's FD-vs-NFE table is the registered version's description
        description = client.get_model_version_by_alias("loomcfm-digits", alias).description
        assert "| method | NFE | fd_digits | seconds |" in description and "| euler-8 | 8.0 |" in description


def _fd_of(images, network, reference):
    stats = FeatureStats.of(network.features(images))
    return frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)


def test_samples_land_between_real_and_noise_and_improve_with_nfe(pipeline):
    root, _ = pipeline
    cfg = load_config("digits", [f"storage.root={root}/store", f"data.local_cache={root}/node"])
    dataset_uri = str(next(p for p in root.glob("store/datasets/digits-*") if "pairs" not in p.name))
    network = feature_network(cfg, dataset_uri)
    reference = reference_stats(dataset_uri, network, cfg.data.local_cache)
    real = _fd_of(dataset_images(dataset_uri, "val", cfg.data.local_cache), network, reference)
    noise = _fd_of(torch.randint(0, 256, (400, 1, 8, 8), dtype=torch.uint8), network, reference)
    results = sorted(root.glob("store/runs/*/eval/*/*/results.json"))
    assert len(results) == 2
    for path in results:
        rows = {r["method"]: r for r in json.loads(path.read_text())["rows"]}
        assert [rows[m]["nfe"] for m in ("euler-1", "euler-4", "euler-8")] == [1, 4, 8]
        assert real < rows["euler-8"]["distance"] < rows["euler-1"]["distance"] < noise, (real, rows, noise)


def test_reflow_trained_on_the_generated_pairs(pipeline):
    root, _ = pipeline
    pairs_uri = next(root.glob("store/datasets/digits-pairs-*"))
    pairs = ShardedDataset(str(pairs_uri))
    assert len(pairs) == 512 and pairs.is_pairs and pairs.pair_seeds.unique().numel() == 512
    client, runs = pipeline_runs(root)
    trains = [r for r in runs if r.data.tags.get("loomcfm.stage", "").startswith("train")]
    kinds = sorted((r.data.tags["loomcfm.stage"], r.data.params["coupling.kind"]) for r in trains)
    assert kinds == [("train", "loom"), ("train_reflow", "pairs")]
    reflow = next(r for r in trains if r.data.params["coupling.kind"] == "pairs")
    assert reflow.data.params["data.uri"] == str(pairs_uri)
    assert reflow.data.params["train.init_from"].endswith("step-00000150.pt")
