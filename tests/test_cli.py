"""`loomcfm sample` with the reference's flags, from our checkpoints and from the reference's format."""

import pytest
import torch
from PIL import Image

from loomcfm_core.checkpoint import load_checkpoint
from loomcfm_core.cli import main
from loomcfm_core.config import load_config
from loomcfm_core.data.cache import cache_dataset
from loomcfm_core.evaluation import load_model
from loomcfm_core.train import fit

SMALL = ["model.channels=32", "model.channel_mult=[1,2]", "model.attn_resolutions=[]", "train.max_steps=3",
         "train.batch_size=16"]


@pytest.fixture()
def checkpoint(tmp_path):
    cfg = load_config("digits", [*SMALL, f"storage.root={tmp_path}/store"])
    return fit(cfg, cache_dataset(cfg).uri, f"{tmp_path}/store/runs/s", torch.device("cpu"))["checkpoint_uri"]


def _sets():
    return [arg for item in SMALL for arg in ("--set", item)]


def test_sample_writes_pngs_and_a_grid(tmp_path, checkpoint, capsys):
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", checkpoint, "--output", str(out), "--num_images", "10", "--nrows", "5",
                 "--method", "midpoint-2", "--batch_size", "4", *_sets()]) == 0
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:05d}.png" for i in range(10)]
    assert Image.open(out / "00000.png").size == (8, 8)
    grid = Image.open(out / "grid.png")
    assert grid.size == (5 * 9 + 1, 2 * 9 + 1)  # 5 per row, 1-pixel padding
    assert '"nfe": 4.0' in capsys.readouterr().out


def test_reference_checkpoints_load_with_their_prefixes(tmp_path, checkpoint):
    cfg = load_config("digits", SMALL)
    ema = load_checkpoint(checkpoint)["ema"]
    reference = {"model": {f"module.backbone.{k}": v for k, v in ema.items()}, "optimizer": {}, "step": 3}
    path = tmp_path / "latest.pth"
    torch.save(reference, path)
    ours, theirs = load_model(cfg, checkpoint, torch.device("cpu")), load_model(cfg, str(path), torch.device("cpu"))
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name


def test_sample_rejects_bad_input(tmp_path, checkpoint, capsys):
    assert main(["sample", "--ckpt", checkpoint, "--output", str(tmp_path), "--num_images", "2",
                 "--method", "euler", *_sets()]) == 1
    assert "expected <solver>-<steps>" in capsys.readouterr().err
    assert main(["sample", "--ckpt", checkpoint, "--output", str(tmp_path), "--num_images", "2",
                 "--method", "euler-1", "--set", "model.channels=64"]) == 1
    assert "weights do not fit the configured model" in capsys.readouterr().err
    torch.save({"something": 1}, tmp_path / "junk.pt")
    assert main(["sample", "--ckpt", str(tmp_path / "junk.pt"), "--output", str(tmp_path), "--num_images", "2",
                 "--method", "euler-1", *_sets()]) == 1
    assert "neither a loomcfm checkpoint nor a reference" in capsys.readouterr().err
