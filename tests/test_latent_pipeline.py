"""`loomcfm run` in an autoencoder's latent space, end to end on a CPU: a generated 64x64 ImageFolder, a tiny
random KL autoencoder (3x64x64 -> 4x8x8), LOOM training on posterior draws, decoded grids, FD rows on the
features of the classifier `cache` trains on the images, latent reflow pairs, reflow training, MLflow."""

import json

import h5py
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from loomcfm_core.checkpoint import load_checkpoint
from loomcfm_core.data.cache import read_manifest
from tests.models.autoencoders import tiny_latent_yaml
from tests.test_pipeline import run_pipeline

pytestmark = pytest.mark.ray

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    (root / "tiny.yaml").write_text(tiny_latent_yaml(root))
    return root, run_pipeline(root, "--config", str(root / "tiny.yaml"))


def _datasets(root):
    """The latent cache, the reflow pairs and the image dataset (``<name>-[latents-|pairs-]<hash>``)."""
    found = {p.name.rsplit("-", 1)[0]: p for p in (root / "store" / "datasets").iterdir()}
    return found["shapes-latents"], found["shapes-pairs"], found["shapes"]


def test_run_prints_fd_rows_of_decoded_samples(pipeline):
    root, out = pipeline
    assert "| method | NFE base | fd_shapes base | NFE reflow | fd_shapes reflow |" in out
    results = sorted(root.glob("store/runs/*/eval/*/*/results.json"))  # <run>/eval/<checkpoint>/<evaluation>/
    assert len(results) == 2
    for path in results:
        result = json.loads(path.read_text())
        assert result["metric"] == "fd_shapes" and result["latent_space"]["autoencoder"]["kind"] == "kl"
        assert [r["nfe"] for r in result["rows"]] == [1, 4]
        assert all(np.isfinite(r["distance"]) and r["distance"] > 0 for r in result["rows"])
        grid = Image.open(path.parent / "samples_euler-4.png")
        assert grid.mode == "RGB" and grid.size == (8 * 66 + 2, 8 * 66 + 2), "decoded 64x64 images, not latents"


def test_training_reads_posterior_latents_and_checkpoints_their_space(pipeline):
    root, _ = pipeline
    latents, pairs, images = _datasets(root)
    manifest = read_manifest(str(latents))
    assert manifest["kind"] == "latents" and manifest["images_uri"] == str(images)
    assert manifest["splits"]["train"]["count"] == 96, "48 images and their 48 mirror images"
    space = manifest["latent_space"]
    base = load_checkpoint(str(next(root.glob("store/runs/tinylatent-*/checkpoints/step-00000040.pt"))))
    assert base["latent_space"] == space and "posterior" in base["rng"][0]
    assert base["coupling"]["table"].shape == (96, 2)


def test_reflow_pairs_hold_latent_targets(pipeline):
    root, _ = pipeline
    latents, pairs, _ = _datasets(root)
    manifest = read_manifest(str(pairs))
    assert manifest["kind"] == "pairs" and manifest["shape"] == [4, 8, 8]
    assert manifest["latent_space"] == read_manifest(str(latents))["latent_space"]
    (shard,) = manifest["splits"]["train"]["shards"]  # one worker's, named part-000-shard-*
    with h5py.File(pairs / shard["path"], "r") as fh:
        assert fh["target"].shape == (64, 4, 8, 8) and fh["target"].dtype == np.float32
    reflowed = [load_checkpoint(str(p)) for p in root.glob("store/runs/*/checkpoints/step-00000020.pt")
                if load_checkpoint(str(p))["coupling"]["kind"] == "pairs"]
    assert len(reflowed) == 1 and reflowed[0]["latent_space"] == manifest["latent_space"]


def test_mlflow_runs_carry_the_autoencoder_and_decoded_grids(pipeline):
    root, _ = pipeline
    client = MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("loomcfm-tinylatent").experiment_id])
    parent = [r for r in runs if r.data.tags.get("loomcfm.stage") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    stages = sorted(r.data.tags["loomcfm.stage"] for r in children)
    assert stages == ["cache", "evaluate", "evaluate_reflow", "pairs", "train", "train_reflow"]
    assert all(r.info.status == "FINISHED" for r in [*parent, *children])
    latents, _, _ = _datasets(root)
    space = read_manifest(str(latents))["latent_space"]
    for run in children:
        params = run.data.params
        assert params["autoencoder.sha256"] == space["autoencoder"]["sha256"], run.data.tags["loomcfm.stage"]
        assert params["autoencoder.weights"] == space["autoencoder"]["weights"]
        assert float(params["autoencoder.scale"]) == space["scale"] and params["model.autoencoder.scale"] == "null"
        if run.data.tags["loomcfm.stage"] == "train":
            assert {"train/loss", "coupling/cost_before", "coupling/swaps"} <= set(run.data.metrics)
        if run.data.tags["loomcfm.stage"].startswith("evaluate"):
            history = client.get_metric_history(run.info.run_id, "fd_shapes/euler")
            assert [m.step for m in history] == [1, 4], "the distance per solver against NFE"
            files = {a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "eval")}
            assert {"samples_euler-1.png", "samples_euler-4.png", "fd_vs_nfe.png"} <= files
    assert set(client.get_registered_model("loomcfm-tinylatent").aliases) == {"base", "reflow"}
    cache = next(r for r in children if r.data.tags["loomcfm.stage"] == "cache")
    assert cache.data.metrics["classifier_val_accuracy"] >= 0.9, "the FD features tell the classes apart"
