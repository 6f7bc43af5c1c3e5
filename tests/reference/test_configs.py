"""The nine YAMLs of the reference's ``configs/`` (Araachie/loom-cfm @213f24f) with the command that matches
each: the ``_eval.yaml`` files with ``sample`` and ``evaluate``, the training ones with ``train`` and ``pairs``
(``generate_pairs.py`` takes the training config), the reflow one with ``train``.

The reference is GPL-3.0, so its files are not copied here: each YAML is generated from the key/value facts
read off it (:data:`FACTS`), in its structure and with every key it has. The commands run on tiny inputs in
the reference's layouts under the test's working folder, where the YAMLs' relative ``./data/...`` paths point
(the reference runs from its repository root), and on tiny random checkpoints in the reference's layout
(``model`` holding ``backbone.*``, and ``ae.*`` for FFHQ); only the network is made small, with ``--set``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from loomcfm_core.checkpoint import load_checkpoint
from loomcfm_core.checksums import sha256_file
from loomcfm_core.config import load_config, load_config_text
from loomcfm_core.models.loading import build_model, check_buildable
from loomcfm_core.reference.config import translate
from tests.data.test_cache import _pickle, write_cifar, write_imagefolder
from tests.data.test_pairs import write_reference_pairs
from tests.models.autoencoders import reference_checkpoint, save_ldm, tiny_kl
from tests.run_cli import call, sets

M = [f"midpoint-{n}" for n in (1, 2, 4, 6)]
# name -> (data: name, data_root, size, flip; model: in_channels, input_size, ch, ch_mult, num_res_blocks,
# attention rates; training: epochs, num_caches, batch, lr, warm-up; evaluation: batch, real, fake, steps)
FACTS = {
    "cifar10_eval": (("cifar10", "./data/CIFAR10", 32, False), (3, 32, 128, [1, 2, 2, 2], 2, [2]), None,
                     (16, 10000, 50000, ["midpoint-6", "dopri5-1"])),
    "cifar10_ot_cached": (("cifar10", "./data/CIFAR10", 32, True), (3, 32, 128, [1, 2, 2, 2], 2, [2]),
                          (1000, 6, 32, 0.0002, 5000), (16, 50000, 5000, M)),
    "cifar10_ot_cached_reflow": (("reflow_cifar10", ".data/CIFAR10_reflow", 32, False),
                                 (3, 32, 128, [1, 2, 2, 2], 2, [2]), (200, None, 256, 0.00002, 5000),
                                 (16, 50000, 5000, M)),
    "ffhq256_latent_eval": (("h5", "./data/ffhq256", 256, False), (4, 32, 256, [1, 2, 3, 4], 2, [2, 4, 8]), None,
                            (4, 50000, 50000, M[:3] + ["dopri5-1"])),
    "ffhq256_latent_ot_cached": (("h5", "./data/ffhq256", 256, True), (4, 32, 256, [1, 2, 3, 4], 2, [2, 4, 8]),
                                 (500, 4, 32, 0.00002, 3500), (4, 10000, 5000, M)),
    "imagenet32_eval": (("imagenet", "./data/imagenet32", 32, False), (3, 32, 128, [1, 2, 2, 2], 3, [2, 4]), None,
                        (16, 50000, 50000, M[1:] + ["dopri5-1"])),
    "imagenet32_ot_cached": (("imagenet", "./data/imagenet32", 32, True), (3, 32, 128, [1, 2, 2, 2], 3, [2, 4]),
                             (200, 2, 128, 0.0001, 20000), (16, 50000, 5000, M)),
    "imagenet64_eval": (("imagefolder", "./data/imagenet64", 64, False), (3, 64, 192, [1, 2, 3, 4], 2, [4]), None,
                        (16, 50000, 50000, M[1:] + ["dopri5-1"])),
    "imagenet64_ot_cached": (("imagefolder", "./data/imagenet64", 64, True), (3, 64, 192, [1, 2, 3, 4], 2, [4]),
                             (575, 1, 24, 0.0001, 20000), (16, 50000, 5000, M)),
}
AE_CHECKPOINT = "./ae_checkpoints/vae-ft-mse-840000-ema-pruned.ckpt"
# only the network shrinks, so that a CPU runs it in a test; the reference's keys stay as they are
SMALL_NET = ["model.channels=32", "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[]"]
# what our config takes from the reference's keys but leaves to other keys of ours, never silently
NOT_MAPPED = {"evaluation.num_real_samples_for_fid", "training.coupling_params.cache_dir", "training.attracting",
              "training.loss_weights.curvature_loss", "model.num_heads", "data.image_size",
              "evaluation.batching.num_workers", "data.eval_data_root"}


def reference_tree(name: str) -> dict:
    """The reference's ``configs/<name>.yaml`` as a tree, from :data:`FACTS`."""
    (data_name, root, size, flip), (in_ch, input_size, ch, mult, blocks, rates), training, evaluation = FACTS[name]
    reflow = data_name.startswith("reflow_")
    data = {"name": data_name, "data_root": root, "image_size": size, "random_flip": flip}
    if reflow:
        data = {"name": data_name, "data_root": root, "eval_data_root": "./data/CIFAR10", "image_size": size,
                "random_flip": flip}
    model = {"in_channels": in_ch, "out_ch": in_ch, "input_size": input_size, "ch": ch, "ch_mult": mult,
             "num_res_blocks": blocks, "attn_resolutions": rates, "dropout": 0.1, "resamp_with_conv": True,
             "num_heads": 4, "num_head_channels": 64}
    if in_ch == 4:
        model.update(ae_config="kl_f8", ae_checkpoint=AE_CHECKPOINT)
    if reflow:
        model["init_from_checkpoint"] = "./data/CIFAR10/model.pth"
    batch, real, fake, steps = evaluation
    base = re.sub(r"(_eval|_ot_cached|_ot_cached_reflow)$", "", name)
    tree = {"name": f"{'reflow_' if reflow else ''}{base}_ot_cached", "data": data, "model": model}
    if training:
        epochs, caches, train_batch, lr, warmup = training
        tree["training"] = {
            "num_epochs": epochs, "sigma": 1e-7, "attracting": False, "t_dist": "uniform", "source": "normal",
            "coupling": "independent" if reflow else "ot_cached_seed",
            "coupling_params": None if reflow else {"cache_dir": f"{root}/noise_cache", "num_caches": caches},
            "resample_every": epochs, "train_after": 0, "use_fp16": False, "ema_decay": 0.9999,
            "batching": {"batch_size": train_batch, "num_workers": 15 if reflow else 4},
            "optimizer": {"optimizer": "Adam", "learning_rate": lr, "weight_decay": 0.0, "grad_clip": 1.0,
                          "scheduler_p": 0.0, "num_warmup_steps": warmup},
            "loss_weights": {"flow_matching_loss": 1.0, "curvature_loss": 0.0}}
    tree["evaluation"] = {"type": "FID", "use_fp16": False, "batching": {"batch_size": batch, "num_workers": 4},
                          "num_real_samples_for_fid": real, "num_samples_for_fid": fake, "steps_to_evaluate": steps}
    return tree


def write_config(name: str, folder: Path) -> str:
    path = folder / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(reference_tree(name), sort_keys=False))
    return str(path)


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)


def write_data(name: str, cwd: Path) -> None:
    """A few images where the YAML's ``data_root`` points, in the layout the reference reads there."""
    data_name, root, size, _ = FACTS[name][0]
    root = cwd / root
    train, val = (_images(5, size, 0), np.arange(5) % 2), (_images(2, size, 1), np.arange(2) % 2)
    if data_name == "cifar10":
        write_cifar(root / "train" / "cifar-10-batches-py", train, val)
    elif data_name == "imagenet":  # train/train_data_batch_<i>, val/val_data, labels 1..1000
        for split, (images, labels), file in (("train", train, "train_data_batch_1"), ("val", val, "val_data")):
            (root / split).mkdir(parents=True)
            _pickle(root / split / file, images.reshape(len(images), -1), labels + 1, False)
    elif data_name == "imagefolder":
        write_imagefolder(root, {"train": train, "val": val})
    elif data_name == "h5":  # a group per image holding its HWC array and its label
        for split, (images, labels) in (("train", train), ("val", val)):
            (root / split).mkdir(parents=True)
            with h5py.File(root / split / "shard_0001.hdf5", "w") as fh:
                for i, (image, label) in enumerate(zip(images, labels)):
                    group = fh.create_group(str(i))
                    group.create_dataset("image", data=image.transpose(1, 2, 0))
                    group.attrs["label"] = label
    else:
        write_reference_pairs(root / "train", 8, per_shard=4, shape=(3, size, size))


def write_checkpoint(name: str, path: Path, *overrides: str) -> Path:
    """A tiny random checkpoint in the reference's layout for the YAML's (shrunk) network, with the FFHQ
    model's KL-f8 autoencoder as ``ae.*`` (a tiny one) and its ``ae.scale``."""
    cfg = load_config(write_config(name, path.parent), [*SMALL_NET, *overrides])
    torch.manual_seed(0)
    backbone = {k: v + 0.01 * torch.randn_like(v) for k, v in build_model(cfg).state_dict().items()}
    autoencoder = tiny_kl(size=256) if cfg.is_latent else None
    return reference_checkpoint(path, backbone, autoencoder, 0.2 if autoencoder is not None else None)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> list[str]:
    """One MLflow store for the module's commands (a new SQLite store costs seconds to create)."""
    return [f"tracking.local_dir={tmp_path_factory.mktemp('mlflow')}"]


@pytest.mark.parametrize("name", list(FACTS))
def test_every_reference_config_translates_whole(name, tmp_path):
    (data_name, root, size, flip), (in_ch, input_size, ch, mult, blocks, rates), training, evaluation = FACTS[name]
    out = translate(reference_tree(name), name)
    assert {key for key, _, _ in out.unmapped} <= NOT_MAPPED, out.report(name)
    cfg = load_config(write_config(name, tmp_path))
    check_buildable(cfg)  # the full-size network exists
    downsample = 8 if in_ch == 4 else 1
    assert (cfg.data.channels, cfg.data.resolution, cfg.flow_shape) == (3, size, (in_ch, input_size, input_size))
    assert (cfg.model.channels, cfg.model.channel_mult, cfg.model.num_res_blocks) == (ch, mult, blocks)
    assert cfg.model.attn_resolutions == [input_size // rate for rate in rates]
    assert cfg.data.hflip == flip and cfg.eval.methods == evaluation[3] and cfg.eval.num_samples == evaluation[2]
    kind = {"cifar10": "cifar10", "imagenet": "imagenet32", "imagefolder": "imagefolder", "h5": "hdf5",
            "reflow_cifar10": "pairs"}[data_name]
    assert cfg.data.source.startswith(f"{kind}:{(tmp_path / root).resolve()}")
    ae = cfg.model.autoencoder
    if in_ch == 4:
        assert (ae.kind, ae.downsample, ae.latent_channels) == ("kl", downsample, 4)
        assert ae.weights == str((tmp_path / AE_CHECKPOINT).resolve())
    else:
        assert ae is None
    if training:
        epochs, caches, batch, lr, warmup = training
        assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps) == (epochs, batch, lr,
                                                                                                   warmup)
        assert cfg.coupling.kind == ("pairs" if caches is None else "loom")
        assert caches is None or cfg.coupling.num_seeds == caches


def test_other_reference_autoencoders(tmp_path):
    tree = reference_tree("ffhq256_latent_eval")
    tree["model"].update(ae_config="vq_f16", in_channels=8, out_ch=8, input_size=16, ch_mult=[1, 2])
    tree["model"]["attn_resolutions"] = [2]
    cfg = load_config(str(_dump(tmp_path / "vq16.yaml", tree)))
    assert (cfg.model.autoencoder.kind, cfg.data.resolution, cfg.flow_shape) == ("vq", 256, (8, 16, 16))
    tree["model"].update(ae_config="kl_f4")
    assert any(key == "model.ae_checkpoint" and "kl_f8, vq_f8, vq_f16" in why for key, _, why in
               translate(tree).unmapped)
    del tree["model"]["ae_checkpoint"]  # the reference builds no autoencoder then: a pixel-space model
    assert translate(tree).tree["model"].get("autoencoder") is None


def _dump(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("name", [n for n in FACTS if n.endswith("_eval")])
def test_eval_configs_sample_a_reference_checkpoint(name, tmp_path):
    """The reference README's ``sample.py --config configs/<x>_eval.yaml --ckpt <its model.pth> ...``."""
    ckpt = write_checkpoint(name, tmp_path / "model.pth")
    proc = call("sample", "--config", write_config(name, tmp_path), "--ckpt", str(ckpt), "--output", "out",
                "--num_images", "2", "--method", "euler-1", *sets(*SMALL_NET))
    assert proc.returncode == 0, proc.stderr[-3000:]
    size = FACTS[name][0][2]
    assert Image.open(tmp_path / "out" / "00001.png").size == (size, size)


@pytest.mark.parametrize("name", [n for n in FACTS if n.endswith("_ot_cached")])
def test_training_configs_generate_pairs_from_a_reference_checkpoint(name, tmp_path, tracking):
    """``generate_pairs.py --config configs/<x>_ot_cached.yaml --ckpt ... --output ...``."""
    ckpt = write_checkpoint(name, tmp_path / "model.pth")
    proc = call("pairs", "--config", write_config(name, tmp_path), "--ckpt", str(ckpt), "--output", "pairs",
                "--num_images", "2", "--method", "euler-1", "--batch_size", "2", *sets(*SMALL_NET, *tracking))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    in_ch, size = FACTS[name][1][:2]
    assert manifest["splits"]["train"]["count"] == 2 and manifest["shape"] == [in_ch, size, size]


@pytest.mark.ray
def test_ffhq_configs_train_and_evaluate(tmp_path, random_inception, tracking):
    """``train.py --config configs/ffhq256_latent_ot_cached.yaml`` encodes the reference's HDF5 images with the
    autoencoder its ``ae_checkpoint`` names (a latent-diffusion ``.ckpt``, its sha256 beside it) and trains in
    its latent space; ``evaluate.py --config configs/ffhq256_latent_eval.yaml --ckpt model.pth`` decodes a
    reference checkpoint's samples with the checkpoint's own ``ae.*`` (another autoencoder than the file's)
    and scores them with Inception (random weights: none can be downloaded here)."""
    write_data("ffhq256_latent_ot_cached", tmp_path)
    save_ldm(tiny_kl(seed=3, size=256), tmp_path / AE_CHECKPOINT)
    proc = call("train", "--config", write_config("ffhq256_latent_ot_cached", tmp_path),
                *sets(*SMALL_NET, *tracking, "data.num_workers=0", "train.batch_size=4", "train.max_steps=2",
                      "ray.cpus_per_worker=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(json.loads(proc.stdout[proc.stdout.index("{"):])["checkpoint_uri"])
    assert ckpt["step"] == 2 and ckpt["latent_space"]["autoencoder"]["format"] == "ldm"

    reference = write_checkpoint("ffhq256_latent_eval", tmp_path / "model.pth")
    proc = call("evaluate", "--config", write_config("ffhq256_latent_eval", tmp_path), "--ckpt", str(reference),
                "--methods", "midpoint-1", *sets(*SMALL_NET, *tracking, f"eval.inception_weights={random_inception}",
                                                 f"eval.inception_sha256={sha256_file(random_inception)}",
                                                 "eval.num_samples=2", "eval.batch_size=2", "data.num_workers=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = tmp_path.glob("loomcfm-data/eval/model/fid-n2-*/results.json")
    results = json.loads(results.read_text())
    assert [r["method"] for r in results["rows"]] == ["midpoint-1"] and np.isfinite(results["rows"][0]["distance"])
    assert results["latent_space"]["autoencoder"]["format"] == "reference_checkpoint"


@pytest.mark.ray
def test_reflow_config_trains_on_the_reference_pairs(tmp_path, tracking):
    """``train.py --config configs/cifar10_ot_cached_reflow.yaml``: the pairs ``generate_pairs.py`` wrote are
    cached and trained on, from the checkpoint its ``init_from_checkpoint`` names."""
    name = "cifar10_ot_cached_reflow"
    write_data(name, tmp_path)
    write_checkpoint(name, tmp_path / "data" / "CIFAR10" / "model.pth")
    proc = call("train", "--config", write_config(name, tmp_path),
                *sets(*SMALL_NET, *tracking, "data.num_workers=0", "train.batch_size=4", "train.max_steps=2",
                      "ray.cpus_per_worker=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    ckpt = load_checkpoint(result["checkpoint_uri"])
    assert ckpt["step"] == 2 and load_config_text(ckpt["config_yaml"]).coupling.kind == "pairs"
    assert result["model_alias"] == "reflow"
