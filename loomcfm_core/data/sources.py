"""Readers for the dataset formats users bring, each streaming ``(images uint8 [b,C,H,W], labels int64 [b])``.

A source is named by a string ``kind:argument`` (``data.source``). Every reader checks what it reads and
raises :class:`SourceError` naming the file and what was expected, so a bad input fails with one clear
message instead of a shape error deep inside training.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from loomcfm_core.errors import SourceError

if TYPE_CHECKING:  # the config validates data.source with check_source: only annotations go the other way
    from loomcfm_core.config import DataConfig

SPLITS = ("train", "val")
BATCH = 1024
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}
DIGITS_VAL_SIZE = 297

Batch = tuple[np.ndarray, np.ndarray]


def _natural_key(path: Path) -> list:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path.name)]


def _fingerprint_files(files: list[Path], root: Path) -> str:
    """Identify inputs by name, size and modification time: cheap, and any change re-caches."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


class Source:
    """What the cache needs from a dataset: an identity, per-split counts and a stream of batches."""

    kind = ""
    form = "<dir>"  # what follows ``kind:`` in data.source

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

    def check(self, images: np.ndarray, origin: str) -> np.ndarray:
        if images.dtype != np.uint8:
            raise SourceError(f"{origin}: images must be uint8, got {images.dtype}")
        if images.ndim != 4 or images.shape[1:] != self.shape:
            raise SourceError(f"{origin}: images have shape {tuple(images.shape[1:])} (C,H,W), expected "
                              f"{self.shape} from data.channels and data.resolution")
        return np.ascontiguousarray(images)


class DigitsSource(Source):
    """scikit-learn's bundled 8x8 digits: ships with the package, so nothing is downloaded."""

    kind = "builtin"
    form = "digits"

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


class _PickledBatchesSource(Source):
    """Python pickles of ``{data: uint8 [N, C*H*W] (CHW order), labels: [N]}`` batches."""

    label_offset = 0
    expected = ""

    def __init__(self, data: DataConfig, argument: str) -> None:
        super().__init__(data, argument)
        self.root = Path(argument).expanduser().resolve()
        if not self.root.is_dir():
            raise SourceError(f"{self.kind} source: {self.root} is not a folder ({self.expected})")

    def files(self, split: str) -> list[Path]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        return _fingerprint_files([f for s in SPLITS for f in self.files(s)], self.root)

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
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise SourceError(f"{self.kind} source: {self.root} lacks {', '.join(missing)} ({self.expected})")
        return paths


class Cifar10Source(_PickledBatchesSource):
    """The ``cifar-10-batches-py`` folder of the official python tarball."""

    kind = "cifar10"
    expected = "expected data_batch_1..5 and test_batch from cifar-10-python.tar.gz"

    def files(self, split: str) -> list[Path]:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        return self._require(names)

    def count(self, split: str) -> int:
        return 50_000 if split == "train" else 10_000


class ImageNetBatchesSource(_PickledBatchesSource):
    """Downsampled ImageNet (32x32 or 64x64): ``train_data_batch_1..10`` and ``val_data``, labels 1..1000."""

    kind = "imagenet32"
    label_offset = 1
    expected = "expected train_data_batch_<i> files and val_data from the downsampled-ImageNet release"

    def files(self, split: str) -> list[Path]:
        if split == "val":
            return self._require(["val_data"])
        found = sorted(self.root.glob("train_data_batch_*"), key=_natural_key)
        if not found:
            raise SourceError(f"{self.kind} source: no train_data_batch_* files in {self.root} ({self.expected})")
        return found


class ImageFolderSource(Source):
    """``<dir>/{train,val}/<class>/<image>``; classes are numbered by sorted folder name across both splits."""

    kind = "imagefolder"

    def __init__(self, data: DataConfig, argument: str) -> None:
        super().__init__(data, argument)
        self.root = Path(argument).expanduser().resolve()
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

    def fingerprint(self) -> str:
        return _fingerprint_files([p for s in SPLITS for p, _ in self._files[s]], self.root)

    def count(self, split: str) -> int:
        return len(self._files[split])

    def _read(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        mode = {1: "L", 3: "RGB", 4: "RGBA"}[self.data.channels]
        res = self.data.resolution
        try:
            with Image.open(path) as img:
                img = img.convert(mode)
                if img.size != (res, res):
                    if not self.data.resize:
                        raise SourceError(f"{path}: image is {img.size[0]}x{img.size[1]}, expected {res}x{res} "
                                          "(set data.resize=true to resize and centre-crop)")
                    scale = res / min(img.size)
                    img = img.resize((max(res, round(img.size[0] * scale)), max(res, round(img.size[1] * scale))),
                                     Image.Resampling.BICUBIC)
                    left, top = (img.size[0] - res) // 2, (img.size[1] - res) // 2
                    img = img.crop((left, top, left + res, top + res))
                array = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise SourceError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    def batches(self, split: str) -> Iterator[Batch]:
        files = self._files[split]
        with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decoding releases the GIL
            for start in range(0, len(files), BATCH):
                chunk = files[start:start + BATCH]
                images = np.stack(list(pool.map(self._read, [p for p, _ in chunk])))
                yield self.check(images, str(self.root / split)), np.array([c for _, c in chunk], dtype=np.int64)


class HDF5Source(Source):
    """Already-sharded HDF5 under ``<dir>/{train,val}/*.h5|*.hdf5``.

    Two layouts are read: ours (datasets ``images[n,C,H,W]`` uint8, optional ``labels[n]``) and the reference
    implementation's (one group per item holding an ``image`` HWC array, optional ``label``).
    """

    kind = "hdf5"

    def __init__(self, data: DataConfig, argument: str) -> None:
        super().__init__(data, argument)
        self.root = Path(argument).expanduser().resolve()
        self._files = {}
        for split in SPLITS:
            folder = self.root / split
            files = sorted((p for p in folder.glob("*") if p.suffix in (".h5", ".hdf5")), key=_natural_key) \
                if folder.is_dir() else []
            if not files:
                raise SourceError(f"hdf5 source: no .h5/.hdf5 files in {folder} "
                                  f"(expected {self.root}/{{train,val}}/<shard>.h5)")
            self._files[split] = files

    def fingerprint(self) -> str:
        return _fingerprint_files([p for s in SPLITS for p in self._files[s]], self.root)

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
        keys = sorted(fh.keys(), key=lambda k: _natural_key(Path(k)))
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


SOURCES: dict[str, type[Source]] = {
    cls.kind: cls for cls in (DigitsSource, Cifar10Source, ImageNetBatchesSource, ImageFolderSource, HDF5Source)
}


def source_forms() -> list[str]:
    """The ``data.source`` strings this module reads, e.g. ``cifar10:<dir>``."""
    return [f"{kind}:{cls.form}" for kind, cls in SOURCES.items()]


def check_source(source: str) -> str:
    """``source`` when it names a kind this module reads with an argument it takes (what the config checks
    ``data.source`` with); raises :class:`SourceError` listing the forms otherwise."""
    kind, sep, argument = source.partition(":")
    cls = SOURCES.get(kind) if sep and argument else None
    if cls is None:
        raise SourceError(f"expected one of {', '.join(source_forms())}, got {source!r}")
    if cls.form != Source.form and argument != cls.form:
        raise SourceError(f"the only {kind} dataset is '{kind}:{cls.form}', got {source!r}")
    return source


def open_source(data: DataConfig) -> Source:
    kind, _, argument = data.source.partition(":")
    return SOURCES[kind](data, argument)
