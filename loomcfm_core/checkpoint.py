"""Training checkpoints in storage: ``<run_uri>/checkpoints/step-00001000.pt``.

A checkpoint holds everything needed to continue exactly where training stopped — model, EMA, optimizer,
scheduler, the coupling (LOOM's seed table), the step and every rank's RNG states — so a restarted job
(Ray ``FailureConfig``, a RayJob ``backoffLimit``) resumes rather than starting over, and LOOM's learned
assignments survive. Uploads are atomic, so whatever ``step-*.pt`` is listed is complete.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from loomcfm_core.storage import join, storage_for

FORMAT = "loomcfm-ckpt-v1"
_NAME = re.compile(r"step-(\d+)\.pt$")


def checkpoint_dir(run_uri: str) -> str:
    return join(run_uri, "checkpoints")


def list_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """``(step, uri)`` of the run's complete checkpoints, oldest first."""
    found = []
    for uri in storage_for(run_uri).list(checkpoint_dir(run_uri)):
        match = _NAME.search(uri)
        if match:
            found.append((int(match.group(1)), uri))
    return sorted(found)


def latest_checkpoint(run_uri: str) -> str | None:
    found = list_checkpoints(run_uri)
    return found[-1][1] if found else None


def save_checkpoint(state: dict, run_uri: str, step: int, keep: int) -> str:
    """Upload ``state`` as the step's checkpoint, then delete all but the newest ``keep``."""
    uri = join(checkpoint_dir(run_uri), f"step-{step:08d}.pt")
    with tempfile.TemporaryDirectory(prefix="loomcfm-ckpt-") as tmp:
        path = Path(tmp) / "checkpoint.pt"
        torch.save({"format": FORMAT, **state}, path)
        storage_for(uri).put(path, uri)
    for _, old in list_checkpoints(run_uri)[:-keep]:
        storage_for(old).delete(old)
    return uri


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint from any storage URI (remote ones through a temporary local copy)."""
    with tempfile.TemporaryDirectory(prefix="loomcfm-ckpt-") as tmp:
        path = storage_for(uri).get(uri, Path(tmp) / "checkpoint.pt")
        state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{uri}: not a loomcfm checkpoint (expected format {FORMAT!r})")
    return state
