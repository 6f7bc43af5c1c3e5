"""Reflow: the config that trains on generated pairs, and pairs generation content-addressed like the cache."""

import logging

import h5py
import numpy as np
import pytest
import torch

from loomcfm_core.checkpoint import save_checkpoint
from loomcfm_core.config import load_config
from loomcfm_core.data.dataset import ShardedDataset
from loomcfm_core.models.loading import build_model
from loomcfm_core.layout import pairs_uri
from loomcfm_core.reflow import PAIR_SEED_OFFSET, generate_pairs, reflow_config
from loomcfm_core.sampling import generate, sample_seeds
from tests.conftest import SMALL


def test_reflow_config_trains_on_the_pairs_from_the_checkpoint():
    base = load_config("cifar10", ["train.run_name=base", "train.max_steps=99", "reflow.max_steps=7"])
    out = reflow_config(base, "s3://b/datasets/cifar10-pairs-abc", "s3://b/runs/base/checkpoints/step-1.pt")
    assert out.coupling.kind == "pairs" and out.data.uri == "s3://b/datasets/cifar10-pairs-abc"
    assert out.data.hflip is False and out.train.init_from == "s3://b/runs/base/checkpoints/step-1.pt"
    assert out.train.run_name is None, "a run folder of its own, not the base run's"
    assert (out.train.max_steps, out.train.batch_size, out.train.lr, out.train.warmup_steps, out.train.epochs) == (
        7, base.reflow.batch_size, base.reflow.lr, base.reflow.warmup_steps, base.reflow.epochs)
    assert out.model == base.model and out.eval == base.eval and out.coupling.num_seeds == base.coupling.num_seeds
    assert base.coupling.kind == "loom" and base.train.run_name == "base", "the base config is left as it was"


def test_generated_pairs_are_the_models_samples_from_their_seeds(tmp_path, caplog):
    cfg = load_config("digits", [*SMALL, f"storage.root={tmp_path}/store", "reflow.num_pairs=20",
                                 "reflow.method=euler-2", "sample.batch_size=8", "data.shard_size=16",
                                 "reflow.target_dtype=float32"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    for p in model.out.parameters():  # a network that does not output zeros everywhere
        torch.nn.init.normal_(p, std=0.1)
    ckpt = save_checkpoint({"ema": model.state_dict()}, f"{tmp_path}/store/runs/r", step=1, keep=1)
    uri, manifest = generate_pairs(cfg, ckpt, device=torch.device("cpu"))
    assert uri == pairs_uri(cfg, ckpt)
    assert manifest["kind"] == "pairs" and manifest["method"] == "euler-2"
    assert manifest["target_dtype"] == "float32" and manifest["arrays"]["target"] == "float32"
    assert manifest["splits"]["train"]["count"] == 20 and len(manifest["splits"]["train"]["shards"]) == 2
    pairs = ShardedDataset(uri)
    seeds = sample_seeds(20, offset=PAIR_SEED_OFFSET)
    assert pairs.is_pairs and torch.equal(pairs.pair_seeds, seeds)
    expected = generate(model, cfg.data.shape, "euler-2", seeds[:3], 3, "cpu").images
    got = torch.stack([pairs[i][0] for i in range(3)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(got[0], got[1])
    with caplog.at_level(logging.INFO):
        again_uri, again = generate_pairs(cfg, ckpt, device=torch.device("cpu"))
    assert (again_uri, again["created"]) == (uri, manifest["created"]) and "already generated" in caplog.text
    eval_seeds = sample_seeds(20)
    assert not np.intersect1d(eval_seeds.numpy(), seeds.numpy()).size, "pair noise is never evaluation noise"


def test_reflow_pairs_refuse_flips(tmp_path):
    cfg = load_config("digits", [*SMALL, f"storage.root={tmp_path}/store", "reflow.num_pairs=4",
                                 "reflow.method=euler-1"])
    ckpt = save_checkpoint({"ema": build_model(cfg).state_dict()}, f"{tmp_path}/store/runs/r", step=1, keep=1)
    uri, _ = generate_pairs(cfg, ckpt, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="holds reflow pairs, whose noise is fixed per target: set data.hflip=false"):
        ShardedDataset(uri, hflip=True)


def _spread_model(cfg):
    """A network whose one-step samples overshoot [-1, 1], so clamping and rounding both matter."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    for p in model.out.parameters():
        torch.nn.init.normal_(p, std=1.0)
    return model


def test_uint8_targets_are_the_clamped_rounded_samples_at_a_quarter_of_the_size(tmp_path):
    overrides = [*SMALL, f"storage.root={tmp_path}/store", "reflow.num_pairs=12", "reflow.method=euler-1",
                 "sample.batch_size=12"]
    cfg = load_config("digits", overrides)
    assert cfg.reflow.target_dtype == "uint8", "the default"
    model = _spread_model(cfg)
    ckpt = save_checkpoint({"ema": model.state_dict()}, f"{tmp_path}/store/runs/r", step=1, keep=1)
    uri, manifest = generate_pairs(cfg, ckpt, device=torch.device("cpu"))
    assert manifest["target_dtype"] == "uint8" and manifest["arrays"]["target"] == "uint8"
    wide_uri, _ = generate_pairs(load_config("digits", [*overrides, "reflow.target_dtype=float32"]), ckpt,
                                 device=torch.device("cpu"))
    assert wide_uri != uri, "the target dtype is part of the pairs' identity"

    pairs, wide = ShardedDataset(uri), ShardedDataset(wide_uri)
    with h5py.File(pairs.paths[0], "r") as fh, h5py.File(wide.paths[0], "r") as wide_fh:
        stored, raw = fh["target"], wide_fh["target"][:]
        assert stored.dtype == np.uint8 and wide_fh["target"].dtype == np.float32
        per_pair = stored.dtype.itemsize * int(np.prod(stored.shape[1:]))
        assert per_pair == 64 and wide_fh["target"].dtype.itemsize * int(np.prod(stored.shape[1:])) == 4 * per_pair
        levels = stored[:]
    sample = generate(model, cfg.data.shape, "euler-1", pairs.pair_seeds, 12, "cpu").images
    assert sample.min() < -1 and sample.max() > 1, "the test samples reach outside [-1, 1]"
    expected = np.round((np.clip(sample.numpy(), -1, 1) + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(levels, expected)
    served = torch.stack([pairs[i][0] for i in range(len(pairs))])
    assert torch.equal(served, torch.from_numpy(expected).float() / 127.5 - 1)
    truncated = np.floor((np.clip(raw, -1, 1) + 1) * 127.5)
    assert (truncated != levels).any() and np.abs(truncated - levels).max() <= 1, \
        "rounding, not the reference's truncation, differs by at most one level"
