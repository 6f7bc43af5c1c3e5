import re

import pytest
import yaml

from loomcfm_core.config import ConfigError, load_config, load_config_text, preset_names

PAPER = {  # preset: (K, batch, lr, warm-up, epochs, ch, mult, res blocks, attn)
    "cifar10": (6, 32, 2e-4, 5000, 1000, 128, [1, 2, 2, 2], 2, [16]),
    "imagenet32": (2, 128, 1e-4, 20000, 200, 128, [1, 2, 2, 2], 3, [16, 8]),
    "imagenet64": (1, 24, 1e-4, 20000, 575, 192, [1, 2, 3, 4], 2, [16]),
    "ffhq256_latent": (4, 32, 2e-5, 3500, 500, 256, [1, 2, 3, 4], 2, [16, 8, 4]),
}


def test_presets_ship():
    assert set(preset_names()) >= {"digits", "cifar10", "imagenet32", "imagenet64", "ffhq256_latent",
                                   "cifar10_reflow"}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_hyperparameters(name):
    cfg = load_config(name)
    k, batch, lr, warmup, epochs, ch, mult, blocks, attn = PAPER[name]
    assert (cfg.coupling.kind, cfg.coupling.num_seeds) == ("loom", k)
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps, cfg.train.epochs) == (batch, lr, warmup, epochs)
    assert (cfg.model.channels, cfg.model.channel_mult, cfg.model.num_res_blocks) == (ch, mult, blocks)
    assert cfg.model.attn_resolutions == attn
    assert cfg.train.betas == (0.9, 0.999) and cfg.train.weight_decay == 0.0 and cfg.train.grad_clip == 1.0
    assert cfg.train.ema_decay == 0.9999 and cfg.model.dropout == 0.1 and cfg.train.sigma == 0.0
    assert cfg.data.hflip


def test_reflow_preset():
    cfg = load_config("cifar10_reflow")
    assert cfg.coupling.kind == "pairs" and not cfg.data.hflip
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps, cfg.train.epochs) == (256, 2e-5, 5000, 200)
    assert cfg.model == load_config("cifar10").model


def test_default_is_digits_without_flips():
    cfg = load_config()
    assert cfg.name == "digits" and cfg.data.source == "builtin:digits" and not cfg.data.hflip


def test_overrides_parse_values():
    cfg = load_config("digits", ["train.lr=1e-4", "model.channel_mult=[1,2]", "tracking.uri=http://x:5000",
                                 "train.max_steps=10", "data.hflip=true"])
    assert cfg.train.lr == 1e-4 and cfg.model.channel_mult == [1, 2] and cfg.tracking.uri == "http://x:5000"
    assert cfg.train.max_steps == 10 and cfg.data.hflip is True


@pytest.mark.parametrize("override, key", [
    ("train.lrr=1", "train.lrr"),             # unknown key
    ("nosuch.section=1", "nosuch.section"),   # unknown section
    ("train.batch_size=abc", "train.batch_size"),  # wrong type
    ("train.lr=-1", "train.lr"),              # out of range
    ("coupling.kind=sinkhorn", "coupling.kind"),
    ("model.channels=48", "model.channels"),  # GroupNorm(32) needs multiples of 32
    ("sample.method=euler", "sample.method"),
    ("data.source=mnist:/x", "data.source"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("digits", [override])


def test_user_file_extends_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: cifar10\nname: mine\ntrain:\n  lr: 3.0e-4\n")
    cfg = load_config(str(path))
    assert cfg.name == "mine" and cfg.train.lr == 3e-4 and cfg.coupling.num_seeds == 6


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        load_config(str(path))
    path.write_text("extends: digits\ntrain:\n  lrr: 1\nmodle:\n  channels: 64\n")
    with pytest.raises(ConfigError, match=r"invalid config: train\.lrr: unknown config key; did you mean train\.lr\?"
                                          r".*modle: unknown config key; did you mean model\?"):
        load_config(str(path))


def test_missing_config():
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match=r"'cifar01' is neither a preset .* nor a file; did you mean cifar10"):
        load_config("cifar01")


@pytest.mark.parametrize("key", ["storage.root", "data.uri", "train.init_from", "eval.inception_weights"])
@pytest.mark.parametrize("value", ["s3:/b/x", "S3://b/x", "http://x/y"])
def test_locations_are_checked_naming_the_setting(key, value):
    with pytest.raises(ConfigError, match=re.escape(f"invalid config: {key}: {value!r} is not a storage URI")
                       + r".*; expected a local path, file:///absolute/path or s3://bucket/prefix$"):
        load_config("digits", [f"{key}={value}"])


def test_allowed_changes_are_schedule_keys():
    assert load_config("digits", ["train.allow_changes=[train.lr, train.warmup_steps]"]).train.allow_changes == [
        "train.lr", "train.warmup_steps"]
    with pytest.raises(ConfigError, match=r"'train\.lrr' is not a schedule key; did you mean train\.lr"):
        load_config("digits", ["train.allow_changes=[train.lrr]"])
    with pytest.raises(ConfigError, match=r"'model\.channels' is not a schedule key"):
        load_config("digits", ["train.allow_changes=[model.channels]"])


def test_yaml_round_trip_is_reproducible():
    cfg = load_config("imagenet64", ["train.lr=5e-5"])
    again = load_config_text(cfg.to_yaml())
    assert again == cfg
    assert load_config_text("cifar10") == load_config("cifar10")
    assert yaml.safe_load(cfg.to_yaml())["train"]["lr"] == 5e-5


def test_resolution_must_fit_downsamplings():
    with pytest.raises(ConfigError, match="data.resolution"):
        load_config("digits", ["model.channel_mult=[1,2,2,2,2]"])


def test_flat_keys():
    flat = load_config().flat()
    assert flat["train.lr"] == load_config().train.lr and "coupling.num_seeds" in flat


def test_text_fields_keep_digit_strings():
    cfg = load_config("digits", ["eval.inception_sha256=00000000", "train.run_name=2024", "train.max_steps=7"])
    assert cfg.eval.inception_sha256 == "00000000" and cfg.train.run_name == "2024" and cfg.train.max_steps == 7
    assert load_config("digits", ["train.run_name=null"]).train.run_name is None


def test_attention_sizes_must_exist():
    with pytest.raises(ConfigError, match=r"model.attn_resolutions \[2\] are not feature-map sizes"):
        load_config("cifar10", ["model.attn_resolutions=[2]"])


def test_cli_reads_config_text_from_the_environment(monkeypatch, capsys):
    from loomcfm_core.cli import main

    monkeypatch.setenv("LOOMCFM_CONFIG_YAML", "extends: cifar10\nname: from-env\n")
    assert main(["config", "show", "--set", "train.lr=1e-5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["name"] == "from-env" and shown["train"]["lr"] == 1e-5 and shown["coupling"]["num_seeds"] == 6
    assert main(["config", "show", "--config", "digits"]) == 0  # an explicit --config wins
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "digits"
    monkeypatch.setenv("LOOMCFM_CONFIG_YAML", "train: {lr: -1}")
    assert main(["config", "show"]) == 2
    assert "$LOOMCFM_CONFIG_YAML" in capsys.readouterr().err


def test_latent_preset_shape_comes_from_the_autoencoder():
    cfg = load_config("ffhq256_latent")
    assert cfg.data.source.startswith("imagefolder:") and cfg.data.shape == (3, 256, 256)
    assert cfg.model.autoencoder.kind == "kl" and cfg.flow_shape == (4, 32, 32)
    assert load_config("ffhq256_latent", ["model.autoencoder.downsample=16", "model.attn_resolutions=[8,4,2]",
                                          "model.autoencoder.latent_channels=8"]).flow_shape == (8, 16, 16)
    assert load_config("cifar10").flow_shape == (3, 32, 32), "without an autoencoder the flow sees the images"


def test_autoencoder_section_is_optional_and_settable():
    cfg = load_config("digits", ["model.autoencoder.kind=vq", "model.autoencoder.weights=s3://b/vq",
                                 "model.autoencoder.sha256=00000000", "data.channels=3", "data.resolution=64"])
    assert cfg.model.autoencoder.sha256 == "00000000" and cfg.flow_shape == (4, 8, 8)
    assert load_config("ffhq256_latent", ["model.autoencoder=null", "data.resolution=32",
                                          "model.attn_resolutions=[16]"]).model.autoencoder is None
    # A pixel-space config dumps as before the section existed: its run names and cache keys do not move.
    assert "autoencoder" not in load_config("cifar10").model_dump()["model"]
    assert "model.autoencoder.kind" not in load_config("cifar10").flat()
    again = load_config_text(load_config("ffhq256_latent").to_yaml())
    assert again == load_config("ffhq256_latent") and again.flat() == load_config("ffhq256_latent").flat()


@pytest.mark.parametrize("overrides, message", [
    (["model.autoencoder.weights=/x"], r"model\.autoencoder\.kind: Field required"),
    (["model.autoencoder.downsample=12"], r"model\.autoencoder\.downsample: must be a power of 2"),
    (["data.resolution=260"], r"data\.resolution=260 is not divisible by model\.autoencoder\.downsample=8"),
    (["model.autoencoder.downsample=64"], r"needs the latent side divisible by 8, got 4"),
    (["model.autoencoder.kind=ae"], r"model\.autoencoder\.kind: Input should be 'kl' or 'vq'"),
    (["model.autoencoder.scale=0"], r"model\.autoencoder\.scale: Input should be greater than 0"),
])
def test_bad_autoencoder_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("ffhq256_latent" if "weights" not in overrides[0] else "digits", overrides)


def test_environment_references(monkeypatch):
    monkeypatch.setenv("LOOMCFM_TEST_ROOT", "s3://bucket/prefix")
    monkeypatch.delenv("LOOMCFM_TEST_UNSET", raising=False)
    cfg = load_config_text("storage: {root: '${LOOMCFM_TEST_ROOT}'}\n"
                           "tracking: {local_dir: '${LOOMCFM_TEST_UNSET:-runs}'}\n")
    assert (cfg.storage.root, cfg.tracking.local_dir) == ("s3://bucket/prefix", "runs")
    assert load_config_text("digits", ["data.local_cache=/a/${NOT_A_REFERENCE}"]).data.local_cache == \
        "/a/${NOT_A_REFERENCE}"
    monkeypatch.setenv("LOOMCFM_TEST_EMPTY", "")
    with pytest.raises(ConfigError, match=r"storage\.root: \$\{LOOMCFM_TEST_EMPTY\} needs the environment variable "
                       r"LOOMCFM_TEST_EMPTY"):
        load_config_text("storage: {root: '${LOOMCFM_TEST_EMPTY}'}\n")
