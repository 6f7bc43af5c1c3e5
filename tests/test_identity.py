"""The one table of config key classes, and the run name it gives."""

import pytest

from loomcfm_core.config import Config, load_config
from loomcfm_core.config.tree import schema_keys
from loomcfm_core.identity import (DATASET, FREE, IDENTITY, KEY_CLASSES, SCHEDULE, SCHEDULE_KEYS, changed_keys,
                                   key_class)
from loomcfm_core.layout import default_run_name

DATASET_URI = "/data/datasets/digits-abc"


def test_every_config_key_has_exactly_one_class():
    """A new config key fails here until identity.KEY_CLASSES says what it is (optional sections included:
    ``model.autoencoder.*`` has keys although the default config has no autoencoder)."""
    keys = schema_keys(Config)
    for key in keys:
        assert key_class(key) in (IDENTITY, DATASET, SCHEDULE, FREE), key
    unused = [pattern for pattern in KEY_CLASSES if not any(
        key == pattern or (pattern.endswith(".*") and key.startswith(pattern[:-1])) for key in keys)]
    assert not unused, f"patterns that match no key: {unused}"
    with pytest.raises(KeyError):
        key_class("nosuch.key")


def test_the_classes_the_readme_states():
    assert {key_class(k) for k in ("model.channels", "coupling.kind", "train.batch_size", "train.seed",
                                   "data.hflip", "ray.num_workers", "train.init_from")} == {IDENTITY}
    assert set(SCHEDULE_KEYS) == {"train.lr", "train.warmup_steps", "train.betas", "train.weight_decay",
                                  "train.grad_clip", "train.ema_decay"}
    assert {key_class(k) for k in ("train.max_steps", "train.epochs", "train.log_every", "train.checkpoint_every",
                                   "train.keep_checkpoints", "data.num_workers", "data.local_cache",
                                   "storage.root", "train.run_name", "train.allow_changes")} == {FREE}
    assert key_class("data.source") == key_class("data.resolution") == DATASET


@pytest.mark.parametrize("free", ["train.max_steps=99", "train.epochs=3", "train.log_every=7",
                                  "train.checkpoint_every=9", "train.keep_checkpoints=1", "data.num_workers=3",
                                  "data.local_cache=/elsewhere", "train.lr=1e-5", "eval.num_samples=10",
                                  "reflow.lr=1e-6", "ray.cpus_per_worker=1", "train.lease_seconds=10",
                                  "coupling.pipelined=false"])
def test_run_name_ignores_what_does_not_define_the_run(free):
    """"Train longer" (and any other free or schedule change) finds the same run folder again."""
    assert default_run_name(load_config("digits", [free]), DATASET_URI) == default_run_name(load_config("digits"),
                                                                                            DATASET_URI)


@pytest.mark.parametrize("identity", ["model.channels=64", "coupling.kind=independent", "train.batch_size=64",
                                      "coupling.solver=scipy", "coupling.max_problem=256",
                                      "train.seed=1", "data.hflip=true", "ray.num_workers=2", "train.sigma=0.1"])
def test_run_name_follows_the_identity(identity):
    assert default_run_name(load_config("digits", [identity]), DATASET_URI) != \
        default_run_name(load_config("digits"), DATASET_URI)
    assert default_run_name(load_config("digits"), DATASET_URI + "x") != default_run_name(load_config("digits"),
                                                                                           DATASET_URI)


def test_changed_keys_by_class(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = load_config("digits", ["train.init_from=ckpt.pt"]).flat()
    new = load_config("digits", [f"train.init_from={tmp_path}/ckpt.pt", "train.lr=1e-4", "model.dropout=0.2",
                                 "train.max_steps=5"]).flat()
    changes = changed_keys(old, new)
    assert changes[SCHEDULE] == {"train.lr": (1e-3, 1e-4)}
    assert changes[IDENTITY] == {"model.dropout": (0.1, 0.2)}, "a relative and an absolute path are one file"
    assert changes[FREE] == {"train.max_steps": (None, 5)}


def test_autoencoder_keys_an_encode_batch_is_free_and_paths_compare_absolute(tmp_path, monkeypatch):
    assert key_class("model.autoencoder.weights") == key_class("model.autoencoder.scale") == IDENTITY
    assert key_class("model.autoencoder.batch_size") == FREE
    monkeypatch.chdir(tmp_path)
    latent = ["model.autoencoder.kind=kl", "data.channels=3", "data.resolution=64", "model.attn_resolutions=[8]"]
    relative = load_config("digits", [*latent, "model.autoencoder.weights=ae"])
    absolute = load_config("digits", [*latent, f"model.autoencoder.weights={tmp_path / 'ae'}",
                                      "model.autoencoder.batch_size=4"])
    assert default_run_name(relative, DATASET_URI) == default_run_name(absolute, DATASET_URI)
    assert changed_keys(relative.flat(), absolute.flat()) == {FREE: {"model.autoencoder.batch_size": (32, 4)}}


def test_a_reflow_run_is_named_as_one():
    """Beside its base run in ``runs/``, the reflow training's folder says what it is."""
    from loomcfm_core.reflow import reflow_config

    base = load_config("digits")
    reflowed = reflow_config(base, "/data/datasets/digits-pairs-abc", "/data/runs/x/checkpoints/step-00000001.pt")
    assert default_run_name(reflowed, "/data/datasets/digits-pairs-abc").startswith("digits-reflow-")
    assert "reflow" not in default_run_name(base, DATASET_URI)
