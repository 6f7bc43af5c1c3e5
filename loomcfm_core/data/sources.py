"""The dataset formats users bring, each streaming ``(images uint8 [b,C,H,W], labels int64 [b])``.

A source is named by a string ``kind:argument`` (``data.source``, whose forms are
:data:`loomcfm_core.choices.SOURCE_FORMS`: :data:`SOURCES` has the reader of each). Every reader checks what it
reads and raises :class:`SourceError` naming the file and what was expected, so a bad input fails with one clear
message instead of a shape error deep inside training.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from loomcfm_core.data.images import read_image
from loomcfm_core.data.pairs import read_reference_pairs, reference_pair_files
from loomcfm_core.data.pickled import Cifar10Source, ImageNetBatchesSource
from loomcfm_core.data.source_base import BATCH, SPLITS, Batch, FolderSource, Source, natural_key
from loomcfm_core.errors import SourceError

if TYPE_CHECKING:
    from loomcfm_core.config import DataConfig

__all__ = ["SOURCES", "SPLITS", "Source", "SourceError", "open_source"]
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}
DIGITS_VAL_SIZE = 297
log = logging.getLogger(__name__)


class DigitsSource(Source):
    """scikit-learn's bundled 8x8 digits: ships with the package, so nothing is downloaded."""

    kind = "builtin"

    def __init__(self, data: DataConfig, argument: str) -> None:
        super().__init__(data, argument)
        if (data.channels, data.resolution) != (1, 8):
            raise SourceError(f"builtin:digits is 1x8x8: set data.channels=1 and data.resolution=8 "
                              f"(got {data.channels} and {data.resolution})")

    def fingerprint(self) -> str:
        return "builtin:digits:v1"

    def _split_indices(self) -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits

        n = len(load_digits().target)
        order = np.random.default_rng(0).permutation(n)
        return {"val": np.sort(order[:DIGITS_VAL_SIZE]), "train": np.sort(order[DIGITS_VAL_SIZE:])}

    def count(self, split: str) -> int:
        return len(self._split_indices()[split])

    def batches(self, split: str) -> Iterator[Batch]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        idx = self._split_indices()[split]
        images = np.round(digits.images[idx] * (255.0 / 16.0)).astype(np.uint8)[:, None]
        yield self.check(images, "builtin:digits"), digits.target[idx].astype(np.int64)


class ImageFolderSource(FolderSource):
    """``<dir>/{train,val}/<class>/<image>``; classes are numbered by sorted folder name across both splits."""

    kind = "imagefolder"

    def __init__(self, data: DataConfig, argument: str) -> None:
        super().__init__(data, argument)
        self._files: dict[str, list[tuple[Path, int]]] = {}
        for split in SPLITS:
            if not (self.root / split).is_dir():
                raise SourceError(f"imagefolder source: {self.root / split} is missing "
                                  f"(expected {self.root}/{{train,val}}/<class>/<image>)")
        classes = sorted({d.name for s in SPLITS for d in (self.root / s).iterdir() if d.is_dir()})
        self.classes = {name: i for i, name in enumerate(classes)}
        for split in SPLITS:
            files = [(p, self.classes[d.name]) for d in sorted((self.root / split).iterdir()) if d.is_dir()
                     for p in sorted(d.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
            if not files:
                raise SourceError(f"imagefolder source: {self.root / split} contains no images (expected "
                                  f"<class>/<image> files with one of {', '.join(sorted(IMAGE_EXTENSIONS))})")
            self._files[split] = files

    def all_files(self) -> list[Path]:
        return [p for s in SPLITS for p, _ in self._files[s]]

    def count(self, split: str) -> int:
        return len(self._files[split])

    def batches(self, split: str) -> Iterator[Batch]:
        files, data, converted = self._files[split], self.data, Counter()

        def read(path: Path) -> np.ndarray:
            image, mode = read_image(path, data.channels, data.resolution, data.resize, data.convert)
            converted[mode] += mode is not None
            return image

        with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decoding releases the GIL
            for start in range(0, len(files), BATCH):
                chunk = files[start:start + BATCH]
                images = np.stack(list(pool.map(read, [p for p, _ in chunk])))
                yield self.check(images, str(self.root / split)), np.array([c for _, c in chunk], dtype=np.int64)
        for mode, count in sorted((m, c) for m, c in converted.items() if m):
            log.info("%s/%s: converted %d %s images to %d channels (data.convert=true)", self.root, split, count,
                     mode, data.channels)


class HDF5Source(FolderSource):
    """Already-sharded HDF5 under ``<dir>/{train,val}/*.h5|*.hdf5``.

    Two layouts are read: ours (datasets ``images[n,C,H,W]`` uint8, optional ``labels[n]``) and the reference
    implementation's (one group per item holding an ``image`` HWC array, optional ``label``).
    """

    kind = "hdf5"

    def __init__(self, data: DataConfig, argument: str) -> None:
        super().__init__(data, argument)
        self._files = {}
        for split in SPLITS:
            folder = self.root / split
            files = sorted((p for p in folder.glob("*") if p.suffix in (".h5", ".hdf5")), key=natural_key) \
                if folder.is_dir() else []
            if not files:
                raise SourceError(f"hdf5 source: no .h5/.hdf5 files in {folder} "
                                  f"(expected {self.root}/{{train,val}}/<shard>.h5)")
            self._files[split] = files

    def all_files(self) -> list[Path]:
        return [p for s in SPLITS for p in self._files[s]]

    def batches(self, split: str) -> Iterator[Batch]:
        for path in self._files[split]:
            try:
                with h5py.File(path, "r") as fh:
                    if "images" in fh:
                        yield from self._read_arrays(fh, path)
                    else:
                        yield from self._read_groups(fh, path)
            except OSError as exc:
                raise SourceError(f"{path}: cannot read HDF5 file ({exc})") from exc

    def _read_arrays(self, fh: h5py.File, path: Path) -> Iterator[Batch]:
        images = fh["images"]
        labels = fh["labels"] if "labels" in fh else None
        if labels is not None and len(labels) != len(images):
            raise SourceError(f"{path}: {len(images)} images but {len(labels)} labels")
        for start in range(0, len(images), BATCH):
            batch = self.check(images[start:start + BATCH], str(path))
            lab = labels[start:start + BATCH].astype(np.int64) if labels is not None else np.zeros(len(batch), np.int64)
            yield batch, lab

    def _read_groups(self, fh: h5py.File, path: Path) -> Iterator[Batch]:
        keys = sorted(fh.keys(), key=lambda k: natural_key(Path(k)))
        for start in range(0, len(keys), BATCH):
            images, labels = [], []
            for key in keys[start:start + BATCH]:
                item = fh[key]
                if not isinstance(item, h5py.Group) or "image" not in item:
                    raise SourceError(f"{path}: item {key!r} has no 'image' dataset (expected an 'images' array "
                                      "or one group per item with an 'image' HWC array)")
                image = np.asarray(item["image"])
                image = image[..., None] if image.ndim == 2 else image
                images.append(image.transpose(2, 0, 1))
                labels.append(int(np.asarray(item["label"])) if "label" in item else int(item.attrs.get("label", 0)))
            try:
                stacked = np.stack(images)
            except ValueError as exc:
                raise SourceError(f"{path}: items have different shapes ({exc})") from exc
            yield self.check(stacked, str(path)), np.array(labels, dtype=np.int64)


class ReferencePairsSource(FolderSource):
    """Reflow pairs in the reference implementation's layout (:mod:`loomcfm_core.data.pairs`): the folder
    ``generate_pairs.py --output`` wrote, or the reflow ``data_root`` holding it as ``train/``. Cached as a
    pairs dataset (train split only) whose noise is the stored arrays and whose targets are uint8 levels."""

    kind = "pairs"
    dataset_kind = "pairs"
    splits = ("train",)
    stored_arrays = {"target": "uint8", "noise": "float32"}

    def __init__(self, data: DataConfig, argument: str) -> None:
        super().__init__(data, argument)
        self.files = reference_pair_files(self.root)
        if not self.files:
            raise SourceError(f"pairs source: no reference pair shards in {self.root} or {self.root / 'train'} "
                              "(expected shard_0001.hdf5 ... with one group per pair holding 'source' and 'target')")

    def all_files(self) -> list[Path]:
        return list(self.files)

    def count(self, split: str) -> int:
        total = 0
        for path in self.files:
            with h5py.File(path, "r") as fh:
                total += len(fh)
        return total

    def arrays(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        return read_reference_pairs(self.files, self.shape, BATCH)


SOURCES: dict[str, type[Source]] = {
    cls.kind: cls for cls in (DigitsSource, Cifar10Source, ImageNetBatchesSource, ImageFolderSource, HDF5Source,
                              ReferencePairsSource)
}


def open_source(data: DataConfig) -> Source:
    kind, _, argument = data.source.partition(":")
    if kind == HDF5Source.kind and reference_pair_files(Path(argument).expanduser()):
        log.info("%s holds reflow pairs in the reference's layout: reading it as pairs:%s", argument, argument)
        kind = ReferencePairsSource.kind
    return SOURCES[kind](data, argument)
