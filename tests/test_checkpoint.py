"""Checkpoints in storage: a round trip, only the newest k kept, and files that are not checkpoints."""

import pytest
import torch

from loomcfm_core.checkpoint import (FORMAT, latest_checkpoint, list_checkpoints, load_checkpoint,
                                     load_ema_weights, save_checkpoint)
from loomcfm_core.errors import CheckpointError, LoomcfmError


def _state(step: int) -> dict:
    return {"step": step, "ema": {"w": torch.full((2, 3), float(step))}, "rng": [{"cpu": torch.get_rng_state()}]}


def test_checkpoint_round_trip(tmp_path):
    run = str(tmp_path / "run")
    uri = save_checkpoint(_state(7), run, step=7, keep=3)
    assert uri == f"{run}/checkpoints/step-00000007.pt"
    back = load_checkpoint(uri)
    assert back["format"] == FORMAT and back["step"] == 7
    assert torch.equal(back["ema"]["w"], torch.full((2, 3), 7.0))
    assert torch.equal(back["rng"][0]["cpu"], _state(7)["rng"][0]["cpu"])
    assert torch.equal(load_ema_weights(uri)["w"], back["ema"]["w"])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_only_the_newest_k_are_kept(where, tmp_path, request):
    run = str(tmp_path / "run") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/runs/r"
    assert list_checkpoints(run) == [] and latest_checkpoint(run) is None
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(_state(step), run, step=step, keep=2)
    assert [s for s, _ in list_checkpoints(run)] == [40, 50]
    assert latest_checkpoint(run) == f"{run}/checkpoints/step-00000050.pt"
    assert load_checkpoint(latest_checkpoint(run))["step"] == 50


def test_listing_ignores_other_files(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(_state(3), str(run), step=3, keep=5)
    (run / "checkpoints" / "notes.txt").write_text("x")
    (run / "checkpoints" / "step-00000009.pt.partial").write_text("x")
    assert [s for s, _ in list_checkpoints(str(run))] == [3]


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    junk = tmp_path / "junk.pt"
    torch.save({"something": 1}, junk)
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a loomcfm checkpoint \(expected format 'loomcfm-ckpt-v1'\)"):
        load_checkpoint(str(junk))
    with pytest.raises(CheckpointError, match="neither a loomcfm checkpoint nor a reference LOOM-CFM checkpoint"):
        load_ema_weights(str(junk))
    torch.save({"model": {"head.weight": torch.zeros(1)}}, junk)  # a reference-like dict without backbone.*
    with pytest.raises(CheckpointError, match="neither"):
        load_ema_weights(str(junk))
    assert issubclass(CheckpointError, LoomcfmError) and issubclass(CheckpointError, ValueError)
