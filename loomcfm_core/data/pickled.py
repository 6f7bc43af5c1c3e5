"""Sources stored as Python pickles of ``{data: uint8 [N, C*H*W] (CHW order), labels: [N]}`` batches: the
official CIFAR-10 python batches and the downsampled-ImageNet release."""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loomcfm_core.data.source_base import SPLITS, Batch, FolderSource, natural_key
from loomcfm_core.errors import SourceError

if TYPE_CHECKING:
    from loomcfm_core.config import DataConfig

class PickledBatchesSource(FolderSource):
    """Python pickles of ``{data: uint8 [N, C*H*W] (CHW order), labels: [N]}`` batches."""

    label_offset = 0
    expected = ""

    def __init__(self, data: DataConfig, argument: str) -> None:
        super().__init__(data, argument)
        if not self.root.is_dir():
            raise SourceError(f"{self.kind} source: {self.root} is not a folder ({self.expected})")

    def files(self, split: str) -> list[Path]:
        raise NotImplementedError

    def all_files(self) -> list[Path]:
        return [f for s in SPLITS for f in self.files(s)]

    def _load(self, path: Path) -> Batch:
        try:
            with open(path, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
            raise SourceError(f"{self.kind} source: cannot read {path}: truncated or corrupt pickle "
                              f"({type(exc).__name__}: {exc})") from exc
        if not isinstance(batch, dict):
            raise SourceError(f"{path}: expected a pickled dict with 'data' and 'labels', got {type(batch).__name__}")
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        if "data" not in batch or "labels" not in batch:
            raise SourceError(f"{path}: expected keys 'data' and 'labels', found {sorted(batch)}")
        flat = np.asarray(batch["data"])
        labels = np.asarray(batch["labels"], dtype=np.int64) - self.label_offset
        c, h, w = self.shape
        if flat.ndim != 2 or flat.shape[1] != c * h * w:
            side = math.isqrt(flat.shape[-1] // c) if flat.ndim == 2 else None
            hint = f" (looks like {side}x{side}: set data.resolution={side})" if side and side * side * c == flat.shape[-1] else ""
            raise SourceError(f"{path}: 'data' has shape {flat.shape}, expected (N, {c * h * w}) for "
                              f"{c}x{h}x{w} images{hint}")
        if len(labels) != len(flat):
            raise SourceError(f"{path}: {len(flat)} images but {len(labels)} labels")
        return self.check(flat.reshape(-1, c, h, w), str(path)), labels

    def batches(self, split: str) -> Iterator[Batch]:
        for path in self.files(split):
            yield self._load(path)

    def _require(self, names: list[str]) -> list[Path]:
        paths = [self.root / name for name in names]
        missing = [p.relative_to(self.root).as_posix() for p in paths if not p.is_file()]
        if missing:
            raise SourceError(f"{self.kind} source: {self.root} lacks {', '.join(missing)} ({self.expected})")
        return paths


class Cifar10Source(PickledBatchesSource):
    """The ``cifar-10-batches-py`` folder of the official python tarball."""

    kind = "cifar10"
    expected = "expected data_batch_1..5 and test_batch from cifar-10-python.tar.gz"

    def files(self, split: str) -> list[Path]:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        return self._require(names)

    def count(self, split: str) -> int:
        return 50_000 if split == "train" else 10_000


class ImageNetBatchesSource(PickledBatchesSource):
    """Downsampled ImageNet (32x32 or 64x64): ``train_data_batch_1..10`` and ``val_data``, labels 1..1000.

    Two layouts: all files in ``<dir>`` (as the release unpacks), or the reference implementation's
    ``<dir>/train/train_data_batch_*`` and ``<dir>/val/val_data`` (its ``data_root``).
    """

    kind = "imagenet32"
    label_offset = 1
    expected = ("expected train_data_batch_<i> files and val_data from the downsampled-ImageNet release, in <dir> "
                "or as <dir>/train/train_data_batch_<i> and <dir>/val/val_data")

    def __init__(self, data: DataConfig, argument: str) -> None:
        super().__init__(data, argument)
        flat = any(self.root.glob("train_data_batch_*")) or (self.root / "val_data").exists()
        split = (self.root / "train").is_dir() or (self.root / "val").is_dir()
        if flat and split:
            raise SourceError(f"{self.kind} source: {self.root} holds both layouts (batch files directly and "
                              "train/ or val/ folders); keep one")
        self.folders = {s: self.root / s if split else self.root for s in SPLITS}

    def files(self, split: str) -> list[Path]:
        folder = self.folders[split]
        if split == "val":
            return self._require([folder.relative_to(self.root).joinpath("val_data").as_posix()])
        found = sorted(folder.glob("train_data_batch_*"), key=natural_key)
        if not found:
            raise SourceError(f"{self.kind} source: no train_data_batch_* files in {folder} ({self.expected})")
        return found
