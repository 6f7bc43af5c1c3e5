"""Training checkpoints in storage, where :mod:`loomcfm_core.layout` puts them (``<run>/checkpoints/step-N.pt``).

A checkpoint holds everything needed to continue exactly where training stopped — model, EMA, optimizer,
scheduler, the coupling (LOOM's seed table), the step and every rank's RNG states — so a restarted job
(Ray ``FailureConfig``, a RayJob ``backoffLimit``) resumes rather than starting over, and LOOM's learned
assignments survive. Uploads are atomic, so whatever ``step-*.pt`` is listed is complete.
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from loomcfm_core.checksums import sha256_file
from loomcfm_core.errors import CheckpointError
from loomcfm_core.layout import checkpoint_dir, checkpoint_step, checkpoint_uri, set_aside_uri
from loomcfm_core.storage import storage_for

FORMAT = "loomcfm-ckpt-v1"


def list_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """``(step, uri)`` of the run's complete checkpoints, oldest first."""
    found = [(checkpoint_step(uri), uri) for uri in storage_for(run_uri).list(checkpoint_dir(run_uri))]
    return sorted((step, uri) for step, uri in found if step is not None)


def latest_checkpoint(run_uri: str) -> str | None:
    found = list_checkpoints(run_uri)
    return found[-1][1] if found else None


def write_state(state: dict, uri: str) -> str:
    """Upload ``state`` to ``uri`` atomically, in the form :func:`load_checkpoint` reads."""
    with tempfile.TemporaryDirectory(prefix="loomcfm-ckpt-") as tmp:
        path = Path(tmp) / "checkpoint.pt"
        torch.save({"format": FORMAT, **state}, path)
        return storage_for(uri).put(path, uri)


def save_checkpoint(state: dict, run_uri: str, step: int, keep: int) -> str:
    """Upload ``state`` as the step's checkpoint, then delete all but the newest ``keep``."""
    uri = write_state(state, checkpoint_uri(run_uri, step))
    for _, old in list_checkpoints(run_uri)[:-keep]:
        storage_for(old).delete(old)
    return uri


def rewind(run_uri: str, step: int) -> list[str]:
    """Make step ``step``'s checkpoint the run's latest (``-1``: keep the latest), so that the next training
    resumes from it; later checkpoints are set aside (:func:`~loomcfm_core.layout.set_aside_uri`) rather than
    deleted, and their new URIs returned. Without this, a run continued from an earlier step would later resume
    from the abandoned, higher-numbered files."""
    found = list_checkpoints(run_uri)
    if step == -1:
        return []
    if step not in {s for s, _ in found}:
        have = ", ".join(str(s) for s, _ in found) or "none"
        raise CheckpointError(f"--resume-step {step}: {checkpoint_dir(run_uri)} has no checkpoint of step {step} "
                              f"(steps: {have}; train.keep_checkpoints keeps only the newest)")
    moved = []
    with tempfile.TemporaryDirectory(prefix="loomcfm-ckpt-") as tmp:
        for later, uri in found:
            if later > step:
                store, target = storage_for(uri), set_aside_uri(run_uri, uri)
                store.put(store.get(uri, Path(tmp) / "checkpoint.pt"), target)
                store.delete(uri)
                moved.append(target)
    return moved


# What torch.load raises for a file that is not a torch pickle (a PNG, a truncated download, text); OSError:
# a zip archive cut short (``[Errno 22] Invalid argument`` from a seek past its end), the copy being local.
_NOT_A_PICKLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError, AttributeError,
                 ImportError, IndexError, OSError)


@contextmanager
def _local_copy(uri: str) -> Iterator[Path]:
    """A temporary local copy of a checkpoint, deleted after the ``with`` body ("no checkpoint at" if none)."""
    store = storage_for(uri)
    if not store.exists(uri):
        raise CheckpointError(f"no checkpoint at {uri}")
    with tempfile.TemporaryDirectory(prefix="loomcfm-ckpt-") as tmp:
        yield store.get(uri, Path(tmp) / "checkpoint.pt")


def _load(path: Path, uri: str, map_location: str | torch.device) -> object:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except _NOT_A_PICKLE as exc:
        raise CheckpointError(f"{uri} is not a checkpoint (torch.load: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint from any storage URI (remote ones through a temporary local copy)."""
    with _local_copy(uri) as path:
        state = _load(path, uri, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{uri}: not a loomcfm checkpoint (expected format {FORMAT!r})")
    return state


def reference_parts(state: object) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The ``backbone.*`` and ``ae.*`` weights of a reference LOOM-CFM checkpoint, prefixes stripped (both
    empty for anything else).

    The reference's ``step_N.pth`` / ``latest.pth`` keep the EMA model under ``"model"`` (``module.`` first
    when saved from DDP); a latent model adds its autoencoder under ``ae.`` (latent-diffusion names and
    ``scale``).
    """
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        return {}, {}
    weights = {k.removeprefix("module."): v for k, v in state["model"].items()}
    parts = ({k.removeprefix(p): v for k, v in weights.items() if k.startswith(p)} for p in ("backbone.", "ae."))
    return next(parts), next(parts)


@dataclass
class SamplingWeights:
    """What sampling needs from a checkpoint, read once: the EMA network's weights, the config YAML it was
    trained with (ours; None for the reference's), and for a latent model its latent space: ``latent_space``
    (ours: the autoencoder's identity and the scale) or ``autoencoder`` (a reference checkpoint's ``ae.*``
    tensors, ``scale`` among them, and the file's ``sha256``)."""

    backbone: dict[str, torch.Tensor]
    latent_space: dict | None = None
    autoencoder: dict[str, torch.Tensor] | None = None
    sha256: str | None = None
    config_yaml: str | None = None


def read_sampling_weights(uri: str, map_location: str | torch.device = "cpu") -> SamplingWeights:
    """The EMA weights to sample with, from our checkpoints or the reference implementation's, whose
    ``backbone.*`` names are our UNet's underneath."""
    with _local_copy(uri) as path:
        state = _load(path, uri, map_location)
        if isinstance(state, dict) and state.get("format") == FORMAT:
            return SamplingWeights(state["ema"], state.get("latent_space"), config_yaml=state.get("config_yaml"))
        backbone, autoencoder = reference_parts(state)
        if backbone:  # a reference autoencoder is identified by the file's hash, as configured weights are
            return SamplingWeights(backbone, None, autoencoder or None, sha256_file(path) if autoencoder else None)
    raise CheckpointError(f"{uri}: neither a loomcfm checkpoint nor a reference LOOM-CFM checkpoint "
                          "(expected a dict with 'ema', or 'model' holding 'backbone.*' weights)")


def load_ema_weights(uri: str, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The EMA network's weights of a checkpoint, ours or the reference's (:func:`read_sampling_weights`)."""
    return read_sampling_weights(uri, map_location).backbone


def checkpoint_sha256(uri: str) -> str:
    """The sha256 of a checkpoint's bytes: which training produced it, whatever its URI (a run folder that
    was deleted and trained again writes other bytes under the same name)."""
    with _local_copy(uri) as path:
        return sha256_file(path)
