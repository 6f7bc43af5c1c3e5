"""What every dataset reader is: a :class:`Source` streams ``(images uint8 [b,C,H,W], labels int64 [b])``
per split, with an identity the cache is keyed by; a :class:`FolderSource` reads a local folder."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loomcfm_core.errors import SourceError

if TYPE_CHECKING:
    from loomcfm_core.config import DataConfig

SPLITS = ("train", "val")
BATCH = 1024

Batch = tuple[np.ndarray, np.ndarray]


def natural_key(path: Path) -> list:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path.name)]


def fingerprint_files(files: list[Path], root: Path) -> str:
    """Identify inputs by name, size and modification time: cheap, and any change re-caches."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


class Source:
    """What the cache needs from a dataset: an identity, per-split counts and a stream of batches."""

    kind = ""
    dataset_kind = "images"  # the manifest's ``kind`` of the cached dataset
    splits = SPLITS
    stored_arrays = {"images": "uint8", "labels": "int64"}  # what :meth:`arrays` yields, and their dtypes

    def __init__(self, data: DataConfig, argument: str) -> None:
        self.data = data
        self.argument = argument
        self.shape = data.shape

    @property
    def description(self) -> str:
        return f"{self.kind}:{self.argument}"

    def fingerprint(self) -> str:
        raise NotImplementedError

    def count(self, split: str) -> int | None:
        """Number of images in a split, when known without reading them all (for the progress bar)."""
        return None

    def batches(self, split: str) -> Iterator[Batch]:
        raise NotImplementedError

    def arrays(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        """The named arrays the cache stores, batch by batch (images and labels, for an image source)."""
        for images, labels in self.batches(split):
            yield {"images": images, "labels": labels}

    def check(self, images: np.ndarray, origin: str) -> np.ndarray:
        if images.dtype != np.uint8:
            raise SourceError(f"{origin}: images must be uint8, got {images.dtype}")
        if images.ndim != 4 or images.shape[1:] != self.shape:
            raise SourceError(f"{origin}: images have shape {tuple(images.shape[1:])} (C,H,W), expected "
                              f"{self.shape} from data.channels and data.resolution")
        return np.ascontiguousarray(images)


class FolderSource(Source):
    """A source read from a local folder: named by its resolved path, so ``./x`` and ``/abs/x`` are one
    source (one cache), and fingerprinted by its files' names, sizes and modification times."""

    def __init__(self, data: DataConfig, argument: str) -> None:
        super().__init__(data, argument)
        self.root = Path(argument).expanduser().resolve()
        self.argument = str(self.root)

    def all_files(self) -> list[Path]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        return fingerprint_files(self.all_files(), self.root)
