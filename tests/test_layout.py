"""Where everything lives: every dataset, pairs, run, checkpoint and evaluation URI is built in
loomcfm_core/layout.py, and nowhere else."""

import ast
from pathlib import Path

from loomcfm_core import layout
from loomcfm_core.config import load_config
from loomcfm_core.layout import pairs_key, pairs_uri, run_uri, with_absolute_paths
from tests.models.autoencoders import latent_config

PACKAGE = Path(layout.__file__).resolve().parent
FOLDERS = {"datasets", "runs", "checkpoints", "set-aside", "eval", "converge.pt"}


def test_no_other_module_builds_a_storage_location():
    """A ``join(...)`` with one of the layout's folders, or a path-like string through one (prose aside),
    outside layout.py would be a second owner of the layout."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            texts = []
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "join":
                texts = [a.value.strip("/") for a in node.args if isinstance(getattr(a, "value", None), str)]
                texts = [text for text in texts if text in FOLDERS]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.split() == [node.value]:
                texts = [node.value] if any(f"/{folder}/" in node.value or node.value.startswith(f"{folder}/")
                                            for folder in FOLDERS) or "step-" in node.value else []
            found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {text!r}" for text in texts]
    assert not found, "\n".join(found)


def test_locations_under_the_storage_root(tmp_path):
    cfg = load_config("digits", [f"storage.root={tmp_path}", "train.run_name=r"])
    run = run_uri(cfg, "d")
    assert run == f"{tmp_path}/runs/r"
    assert layout.dataset_uri(cfg, "k") == f"{tmp_path}/datasets/digits-k"
    assert layout.latents_uri(cfg, "k") == f"{tmp_path}/datasets/digits-latents-k"
    assert layout.checkpoint_uri(run, 1000) == f"{run}/checkpoints/step-00001000.pt"
    assert layout.checkpoint_step(layout.checkpoint_uri(run, 1000)) == 1000
    assert layout.checkpoint_step(f"{run}/checkpoints/step-1.pt.tmp-abc") is None
    assert layout.set_aside_uri(run, layout.checkpoint_uri(run, 7)) == f"{run}/set-aside/step-00000007.pt"
    ours = layout.evaluation_uri(cfg, layout.checkpoint_uri(run, 7), "fid", ["euler-4"], "d")
    samples = cfg.eval.num_samples
    assert ours.startswith(f"{run}/eval/step-00000007/fid-n{samples}-")
    other = layout.evaluation_uri(cfg, "s3://b/elsewhere/model.pth", "fid", ["euler-4"], "d")
    assert other.startswith(f"{tmp_path}/eval/model/fid-n{samples}-")
    assert layout.evaluation_uri(cfg, "x.pt", "fid", ["euler-8"], "d") != layout.evaluation_uri(
        cfg, "x.pt", "fid", ["euler-4"], "d"), "another evaluation of one checkpoint gets a folder of its own"


def test_worker_configs_name_the_autoencoder_by_absolute_path(tmp_path, monkeypatch):
    """Generation workers (Ray tasks, other working directories) decode with the autoencoder, so its paths
    travel absolute; the run keeps the name of the config as given (``stages`` reads results back by it):
    ``identity.URI_KEYS`` names a run by the absolute form of these paths."""
    monkeypatch.chdir(tmp_path)
    cfg = latent_config(tmp_path, "weights/kl.safetensors", "model.autoencoder.config=weights/config.json")
    out = with_absolute_paths(cfg)
    assert out.model.autoencoder.weights == str(tmp_path / "weights" / "kl.safetensors")
    assert out.model.autoencoder.config == str(tmp_path / "weights" / "config.json")
    assert cfg.model.autoencoder.weights == "weights/kl.safetensors", "the caller's config is not changed"
    assert with_absolute_paths(load_config("digits")).model.autoencoder is None
    assert run_uri(cfg, "d") == run_uri(out, "d"), "the run's name compares the paths absolute"


def test_pairs_uri_is_content_addressed(tmp_path):
    cfg = load_config("digits", [f"storage.root={tmp_path}"])
    uri, key = pairs_uri(cfg, "ckpt-a"), pairs_key(cfg, "ckpt-a")
    assert uri == f"{tmp_path}/datasets/digits-pairs-{key}" and len(key) == 12
    assert pairs_uri(load_config("digits", [f"storage.root={tmp_path}"]), "ckpt-a") == uri
    assert pairs_key(load_config("digits", [f"storage.root={tmp_path}", "eval.num_samples=10",
                                            "train.lr=1e-5"]), "ckpt-a") == key, "unrelated settings"
    changed = [pairs_key(cfg, "ckpt-b")]
    for override in ("reflow.method=euler-2", "reflow.num_pairs=7", "model.dropout=0.2", "data.shard_size=10"):
        changed.append(pairs_key(load_config("digits", [f"storage.root={tmp_path}", override]), "ckpt-a"))
    assert key not in changed and len(set(changed)) == len(changed)
