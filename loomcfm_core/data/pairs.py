"""Reflow pairs on disk: how generated targets are stored, and the reference implementation's pairs layout.

Our pairs datasets hold each pair's noise as a *seed* and its target either as 8-bit pixels (``uint8``,
the default: clamped to [-1, 1] and rounded, exactly like a cached image, a quarter of float32's size) or
as the unclamped ``float32`` sample. The reference's ``generate_pairs.py`` truncates instead of rounding
(level ``floor(127.5·(x+1))``), and stores the levels as float32 together with the noise array itself;
:func:`reference_pairs_groups` reads that layout so a ``pairs:`` source can cache it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch

from loomcfm_core.choices import TARGET_DTYPES
from loomcfm_core.errors import SourceError, UsageError
from loomcfm_core.sampling import to_uint8


def store_targets(images: torch.Tensor, dtype: str) -> np.ndarray:
    """Generated samples in [-1, 1] (float, [n, C, H, W]) in the form a pairs dataset stores them.

    Args:
        dtype: ``uint8`` — clamped to [-1, 1] and rounded to the nearest of 256 levels, the form images are
            cached in (served back as ``level / 127.5 - 1``); ``float32`` — the samples as generated.
    """
    if dtype not in TARGET_DTYPES:
        raise UsageError(f"reflow.target_dtype must be one of {', '.join(TARGET_DTYPES)}, got {dtype!r}")
    if dtype == "float32":
        return images.float().numpy()
    return to_uint8(images.float()).numpy()


# ---- the reference implementation's pairs layout ----------------------------------------------------------
# ``generate_pairs.py --output <dir>`` writes ``<dir>/shard_0001.hdf5, ...`` (read in name order), one group
# per pair named by its index within the shard ("0", "1", ...), holding ``source`` (the float32 noise,
# C×H×W) and ``target`` (the 8-bit levels of the generated image as float32, C×H×W). Its reflow training
# reads them from ``<data_root>/train/``; both folders are accepted here.

def reference_pair_files(root: Path) -> list[Path]:
    """The shard files of a reference pairs folder, in the reference's order (sorted by name); ``root``
    may be the shard folder or a ``data_root`` holding it as ``train/``. Empty when it holds no pairs."""
    for folder in (root, root / "train"):
        files = sorted(p for p in folder.glob("*") if p.suffix in (".h5", ".hdf5")) if folder.is_dir() else []
        if files and _holds_pairs(files):
            return files
    return []


def _holds_pairs(files: list[Path]) -> bool:
    """Whether the first non-empty shard holds pair groups (``source`` and ``target``)."""
    for path in files:
        with h5py.File(path, "r") as fh:
            if len(fh):
                first = fh[next(iter(fh.keys()))]
                return isinstance(first, h5py.Group) and "source" in first and "target" in first
    return False


def _levels(target: np.ndarray, origin: str) -> np.ndarray:
    """The reference's float32 target levels as uint8, refusing anything that is not a level 0..255."""
    if target.dtype == np.uint8:
        return target
    if not (np.all(target == np.round(target)) and target.min(initial=0) >= 0 and target.max(initial=0) <= 255):
        raise SourceError(f"{origin}: 'target' must hold integer pixel levels 0..255 (as generate_pairs.py "
                          f"writes them), got values in [{target.min()}, {target.max()}]")
    return target.astype(np.uint8)


def read_reference_pairs(files: list[Path], shape: tuple[int, int, int],
                         batch: int = 1024) -> Iterator[dict[str, np.ndarray]]:
    """Stream ``{"target": uint8 [b,C,H,W], "noise": float32 [b,C,H,W]}`` from reference pair shards.

    Args:
        shape: (C, H, W) both arrays must have (``data.channels`` and ``data.resolution``).
    """
    for path in files:
        try:
            with h5py.File(path, "r") as fh:
                count = len(fh)
                missing = [str(i) for i in range(count) if str(i) not in fh]
                if missing:
                    raise SourceError(f"{path}: pair groups must be named 0..{count - 1} (the reference's "
                                      f"layout); {missing[0]!r} is missing")
                for start in range(0, count, batch):
                    targets, noises = [], []
                    for i in range(start, min(start + batch, count)):
                        group, origin = fh[str(i)], f"{path}:{i}"
                        if not isinstance(group, h5py.Group) or "source" not in group or "target" not in group:
                            raise SourceError(f"{origin}: expected a group with 'source' and 'target' datasets")
                        noise, target = np.asarray(group["source"]), np.asarray(group["target"])
                        for name, array in (("source", noise), ("target", target)):
                            if array.shape != shape:
                                raise SourceError(f"{origin}: '{name}' has shape {array.shape} (C,H,W), expected "
                                                  f"{shape} from data.channels and data.resolution")
                        targets.append(_levels(target, origin))
                        noises.append(noise.astype(np.float32))
                    yield {"target": np.stack(targets), "noise": np.stack(noises)}
        except OSError as exc:
            raise SourceError(f"{path}: cannot read HDF5 file ({exc})") from exc
