"""Reference YAML configs (written here in the reference's structure, spec §3 and §7.2, from
Araachie/loom-cfm @213f24f ``configs/*.yaml`` and ``lutils/configuration.py``) translate into ours; every
key is mapped or listed, never dropped."""

import json
import logging

import pytest
import yaml

from loomcfm_core.cli import main
from loomcfm_core.config import load_config
from loomcfm_core.reference.config import is_reference_config, translate

MODEL = {"in_channels": 1, "out_ch": 1, "input_size": 8, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
         "attn_resolutions": [2], "dropout": 0.1, "resamp_with_conv": True, "num_heads": 4, "num_head_channels": 64}
TRAINING = {"num_epochs": 12, "sigma": 0.0000001, "attracting": False, "t_dist": "uniform", "source": "normal",
            "coupling": "ot_cached_seed", "coupling_params": {"cache_dir": "./cache", "num_caches": 3},
            "resample_every": 12, "train_after": 2, "use_fp16": False, "ema_decay": 0.999,
            "batching": {"batch_size": 16, "num_workers": 0},
            "optimizer": {"optimizer": "Adam", "learning_rate": 0.0002, "weight_decay": 0.0, "grad_clip": 1.0,
                          "scheduler_p": 0.0, "num_warmup_steps": 10},
            "loss_weights": {"flow_matching_loss": 1.0, "curvature_loss": 0.0}}
EVALUATION = {"type": "FID", "use_fp16": False, "batching": {"batch_size": 16, "num_workers": 0},
              "num_real_samples_for_fid": 500, "num_samples_for_fid": 500,
              "steps_to_evaluate": ["euler-1", "midpoint-2", 4]}


def reference(tmp_path, **changes):
    tree = {"name": "ref_digits", "data": {"name": "h5", "data_root": str(tmp_path / "data"), "image_size": 8,
                                           "random_flip": True},
            "model": dict(MODEL), "training": json.loads(json.dumps(TRAINING)), "evaluation": dict(EVALUATION)}
    for dotted, value in changes.items():
        *sections, leaf = dotted.split("__")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return tree


def write(tmp_path, tree, name="ref.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_a_reference_config_translates_to_the_expected_config(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        cfg = load_config(write(tmp_path, reference(tmp_path)))
    assert (cfg.name, cfg.data.name, cfg.data.source) == ("ref_digits", "h5", f"hdf5:{tmp_path / 'data'}")
    assert (cfg.data.channels, cfg.data.resolution, cfg.data.hflip, cfg.data.num_workers) == (1, 8, True, 0)
    assert (cfg.model.channels, cfg.model.channel_mult, cfg.model.num_res_blocks) == (32, [1, 2], 1)
    assert (cfg.model.attn_resolutions, cfg.model.num_head_channels, cfg.model.dropout) == ([4], 64, 0.1)
    assert (cfg.coupling.kind, cfg.coupling.num_seeds, cfg.coupling.converge_epochs) == ("loom", 3, 2)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps) == (10, 16, 0.0002, 10)
    assert (cfg.train.ema_decay, cfg.train.sigma, cfg.train.grad_clip, cfg.train.weight_decay) == (0.999, 1e-7, 1.0, 0.0)
    assert (cfg.eval.batch_size, cfg.eval.num_samples) == (16, 500)
    assert cfg.eval.methods == ["euler-1", "midpoint-2", "euler-4"]
    assert "a reference implementation config, translated:" in caplog.text
    assert "model.attn_resolutions -> model.attn_resolutions = [4]" in caplog.text
    unmapped = {key for key, _, _ in translate(reference(tmp_path)).unmapped}
    assert unmapped == {"evaluation.num_real_samples_for_fid", "training.coupling_params.cache_dir",
                        "training.attracting", "training.loss_weights.curvature_loss", "model.num_heads",
                        "data.image_size", "evaluation.batching.num_workers"}


@pytest.mark.parametrize("change, key", [
    ({"training__t_dist": "beta"}, "training.t_dist"),
    ({"training__coupling": "mixed"}, "training.coupling"),
    ({"training__optimizer__scheduler_p": 1.0}, "training.optimizer.scheduler_p"),
    ({"evaluation__steps_to_evaluate": ["euler-1", [4, 0.1]]}, "evaluation.steps_to_evaluate"),
    ({"model__attn_resolutions": [2, 8]}, "model.attn_resolutions"),
    ({"training__something_new": 3}, "training.something_new"),
])
def test_an_unmappable_key_is_listed_with_its_dotted_key(tmp_path, change, key):
    out = translate(reference(tmp_path, **change))
    reasons = {k: why for k, _, why in out.unmapped}
    assert key in reasons, out.report("ref")
    assert f"  {key} = " in out.report("ref")


def test_reflow_and_other_data_layouts(tmp_path):
    out = translate(reference(tmp_path, data__name="reflow_cifar10", data__data_root=str(tmp_path / "pairs"),
                              data__eval_data_root=str(tmp_path / "c10"), training__coupling="independent",
                              training__coupling_params=None, training__train_after=0,
                              model__init_from_checkpoint=str(tmp_path / "model.pth")))
    tree = out.tree
    assert tree["coupling"]["kind"] == "pairs" and tree["data"]["hflip"] is False
    assert tree["data"]["source"] == f"pairs:{tmp_path / 'pairs'}", "it trains on the pairs"
    assert tree["train"]["init_from"] == str(tmp_path / "model.pth")
    assert tree["reflow"] == {"batch_size": 16, "lr": 0.0002, "warmup_steps": 10}
    assert any(k == "data.eval_data_root" and "the base model's config" in why for k, _, why in out.unmapped)
    imagenet = translate(reference(tmp_path, data__name="imagenet", data__data_root="./data/imagenet32"))
    assert imagenet.tree["data"]["source"] == f"imagenet32:{tmp_path / 'data' / 'imagenet32'}", "relative to the CWD"
    ours = load_config("digits").model_dump(mode="json")
    assert not is_reference_config(ours) and not is_reference_config({})


def test_sample_config_show_take_a_reference_eval_config(tmp_path, checkpoint, capsys):
    tree = reference(tmp_path, model__attn_resolutions=[])
    del tree["training"]  # an _eval.yaml
    path = write(tmp_path, tree, "ref_eval.yaml")
    assert main(["config", "show", "--config", path]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["channels"] == 32 and shown["data"]["source"] == f"hdf5:{tmp_path / 'data'}"
    out = tmp_path / "samples"
    assert main(["sample", "--config", path, "--ckpt", checkpoint, "--output", str(out), "--num_images", "4",
                 "--method", "euler-2", "--batch_size", "4"]) == 0
    assert len(list(out.glob("0*.png"))) == 4
