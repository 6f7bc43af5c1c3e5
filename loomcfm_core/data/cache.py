"""Write a source into HDF5 shards plus a manifest, content-addressed by source and config.

Layout under ``<storage.root>/datasets/<name>-<hash>/`` (:func:`loomcfm_core.layout.dataset_uri`)::

    train/shard-00000.h5 ...   images uint8 [n,C,H,W] (one chunk per image), labels int64 [n]
    val/shard-00000.h5 ...     (reflow pairs: train/ only, target [n,C,H,W] and seeds [n] or noise [n,C,H,W])
    manifest.json              written last: counts, shape, source, config hash, sha256 and size per shard

The manifest is the commit marker: a dataset without one is incomplete and is rebuilt, and a dataset whose
manifest carries the same hash and whose shards are as it lists them is reused without reading the source
again; one with a damaged shard is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from loomcfm_core.checksums import sha256_file
from loomcfm_core.config import Config, DataConfig
from loomcfm_core.data.manifest import MANIFEST, read_manifest, verify_shards
from loomcfm_core.data.sources import Source, open_source
from loomcfm_core.errors import StorageError
from loomcfm_core.layout import dataset_uri
from loomcfm_core.storage import join, storage_for

FORMAT = "loomcfm-hdf5-v1"
log = logging.getLogger(__name__)


def cache_key(data: DataConfig, source: Source) -> str:
    """Hash of everything that determines the shards' bytes: format, source identity and shape settings."""
    identity = {"format": FORMAT, "source": source.description, "fingerprint": source.fingerprint(),
                "channels": data.channels, "resolution": data.resolution, "resize": data.resize,
                "convert": data.convert, "shard_size": data.shard_size}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


class ShardWriter:
    """Appends named arrays into fixed-size HDF5 shards and uploads each shard as soon as it is full.

    Arrays are stored uncompressed with one chunk per item, so a random-access read touches one chunk.
    """

    def __init__(self, uri: str, split: str, shard_size: int, workdir: Path, prefix: str = "") -> None:
        self.uri, self.split, self.shard_size, self.workdir, self.prefix = uri, split, shard_size, workdir, prefix
        self.store = storage_for(uri)
        self.shards: list[dict] = []
        self._file: h5py.File | None = None
        self._path: Path | None = None
        self._count = 0

    def _open(self, arrays: dict[str, np.ndarray]) -> None:
        name = f"{self.split}/{self.prefix}shard-{len(self.shards):05d}.h5"
        self._path = self.workdir / name
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self._path, "w")
        for key, value in arrays.items():
            item = value.shape[1:]
            self._file.create_dataset(key, shape=(0, *item), maxshape=(self.shard_size, *item), dtype=value.dtype,
                                      chunks=(1, *item) if item else (min(self.shard_size, 4096),))
        self._count = 0

    def write(self, arrays: dict[str, np.ndarray]) -> None:
        n = len(next(iter(arrays.values())))
        start = 0
        while start < n:
            if self._file is None:
                self._open(arrays)
            take = min(n - start, self.shard_size - self._count)
            for key, value in arrays.items():
                dset = self._file[key]
                dset.resize(self._count + take, axis=0)
                dset[self._count:self._count + take] = value[start:start + take]
            self._count += take
            start += take
            if self._count == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        self._file.close()
        name = self._path.relative_to(self.workdir).as_posix()
        digest, size = sha256_file(self._path), self._path.stat().st_size
        self.store.put(self._path, join(self.uri, name))
        self._path.unlink()
        self.shards.append({"path": name, "count": self._count, "sha256": digest, "size": size})
        self._file = None

    def close(self) -> list[dict]:
        """The shards written (path, count, sha256), in order."""
        if self._file is not None:
            self._flush()
        return self.shards


def write_dataset(uri: str, splits: dict[str, Iterator[dict[str, np.ndarray]]], shard_size: int,
                  manifest: dict, totals: dict[str, int | None] | None = None, desc: str = "caching",
                  finish: Callable[[dict], dict] | None = None) -> dict:
    """Stream each split's batches into shards under ``uri``, then commit ``manifest.json`` last.

    Args:
        finish: completes the manifest after the last shard, before it is committed: for what is known only
            once the data is written (the latent scale).
    """
    written = {}
    with tempfile.TemporaryDirectory(prefix="loomcfm-cache-") as tmp:
        for split, batches in splits.items():
            writer = ShardWriter(uri, split, shard_size, Path(tmp))
            total = (totals or {}).get(split)
            with tqdm(total=total, desc=f"{desc} {split}", unit="img", dynamic_ncols=True) as bar:
                for arrays in batches:
                    writer.write(arrays)
                    bar.update(len(next(iter(arrays.values()))))
            written[split] = writer.close()
    return commit_manifest(uri, manifest, written, finish)


def commit_manifest(uri: str, manifest: dict, shards: dict[str, list[dict]],
                    finish: Callable[[dict], dict] | None = None) -> dict:
    """Write ``manifest.json`` for shards already uploaded (each split's in order): the dataset's commit.

    Args:
        finish: completes the manifest once every split is known to be non-empty (see ``write_dataset``).
    """
    splits = {split: {"count": sum(s["count"] for s in listed), "shards": listed} for split, listed in shards.items()}
    for split, info in splits.items():
        if info["count"] == 0:
            raise StorageError(f"{uri}: split {split!r} produced no items")
    manifest = dict(manifest, format=FORMAT, splits=splits)
    manifest = dict(finish(manifest) if finish else manifest,
                    created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    storage_for(uri).write_text(join(uri, MANIFEST), json.dumps(manifest, indent=2))
    return manifest


@dataclass
class CachedDataset:
    """A cached dataset; ``created`` is false when the same inputs were already cached."""

    uri: str
    manifest: dict
    created: bool


def intact_manifest(uri: str, key: str, local_cache: str) -> dict | None:
    """The manifest of a complete dataset written for ``key`` whose shards are all as it lists them; None
    when there is none. A damaged one (a shard modified, truncated or deleted since) loses its manifest
    first, so while it is rebuilt nothing looks complete."""
    existing = read_manifest(uri)
    if existing is None or existing.get("config_hash") != key:
        return None
    try:
        verify_shards(uri, existing, local_cache)
    except StorageError as exc:
        log.warning("%s: rebuilding it (%s)", uri, str(exc).split("; ")[0])
        storage_for(uri).delete(join(uri, MANIFEST))
        return None
    return existing


def cache_dataset(cfg: Config) -> CachedDataset:
    """Cache ``cfg.data.source`` under the storage root; a no-op when the same inputs are already cached and
    intact, a rebuild when a shard was damaged since."""
    source = open_source(cfg.data)
    key = cache_key(cfg.data, source)
    uri = dataset_uri(cfg, key)
    existing = intact_manifest(uri, key, cfg.data.local_cache)
    if existing is not None:
        log.info("dataset already cached at %s (%s): nothing to do", uri,
                 ", ".join(f"{s}={v['count']}" for s, v in existing["splits"].items()))
        return CachedDataset(uri, existing, created=False)
    splits = {s: source.arrays(s) for s in source.splits}
    manifest = {"name": cfg.data.name, "source": source.description, "config_hash": key,
                "kind": source.dataset_kind, "shape": list(source.shape), "arrays": dict(source.stored_arrays)}
    if source.dataset_kind == "pairs":
        manifest["target_dtype"] = source.stored_arrays["target"]
    manifest = write_dataset(uri, splits, cfg.data.shard_size, manifest,
                             totals={s: source.count(s) for s in source.splits})
    log.info("cached %s at %s", source.description, uri)
    return CachedDataset(uri, manifest, created=True)
