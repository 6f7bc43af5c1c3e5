"""A cached dataset's ``manifest.json`` — its commit marker — and the checks that its shards are the ones
it lists.

Every reader checks every shard it opens: the size always (one ``stat``), the sha256 once per file version
(:func:`loomcfm_core.checksums.file_sha256` keeps a node-local record), so a shard modified, truncated or
deleted after caching is refused with a message naming it instead of being trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

from loomcfm_core.checksums import check_size, fetch_verified, verify_file
from loomcfm_core.errors import StorageError
from loomcfm_core.storage import is_remote, join, storage_for, to_local_path

MANIFEST = "manifest.json"
REPAIR_HINT = "the cached dataset is damaged: run `loomcfm cache` with the same config to repair it"


def read_manifest(uri: str) -> dict | None:
    """The manifest of a dataset URI, or None when the dataset is missing or incomplete."""
    store = storage_for(uri)
    manifest_uri = join(uri, MANIFEST)
    if not store.exists(manifest_uri):
        return None
    return json.loads(store.read_text(manifest_uri))


def require_manifest(uri: str) -> dict:
    """The manifest of a dataset that must exist (one a stage is about to read)."""
    manifest = read_manifest(uri)
    if manifest is None:
        raise StorageError(f"{uri}: no {MANIFEST}; the dataset is missing or incomplete (run `loomcfm cache` "
                           "first, or give the URI of a cached dataset)")
    return manifest


def _shards(uri: str, manifest: dict, split: str) -> list[dict]:
    if split not in manifest["splits"]:
        raise StorageError(f"{uri}: no split {split!r} (has {', '.join(manifest['splits'])})")
    return manifest["splits"][split]["shards"]


def local_shards(uri: str, manifest: dict, split: str, local_cache: str) -> list[Path]:
    """Verified local paths of a split's shards: local datasets are checked where they are, remote shards
    are copied once per node into ``local_cache`` and checked there."""
    paths = []
    for shard in _shards(uri, manifest, split):
        shard_uri = join(uri, shard["path"])
        if not is_remote(uri):
            paths.append(verify_file(to_local_path(shard_uri), shard["sha256"], size=shard.get("size"),
                                     record_dir=local_cache, name=shard_uri, hint=REPAIR_HINT))
            continue
        local = Path(local_cache).expanduser() / "datasets" / uri.rstrip("/").rsplit("/", 1)[-1] / shard["path"]
        paths.append(fetch_verified(shard_uri, local, shard["sha256"], size=shard.get("size"),
                                    record_dir=local_cache, name=shard_uri, hint=REPAIR_HINT))
    return paths


def verify_shards(uri: str, manifest: dict, local_cache: str, splits: tuple[str, ...] | None = None) -> None:
    """Raise :class:`StorageError` naming the first shard that is missing or not what the manifest says.

    Local shards are checked fully (size and sha256); remote ones by size, which needs no download — a
    node that reads them checks their sha256 on the copy it makes.
    """
    for split in splits or tuple(manifest["splits"]):
        if not is_remote(uri):
            local_shards(uri, manifest, split, local_cache)
            continue
        store = storage_for(uri)
        for shard in _shards(uri, manifest, split):
            shard_uri = join(uri, shard["path"])
            size = store.size(shard_uri)
            if size is None:
                raise StorageError(f"{shard_uri}: missing; {REPAIR_HINT}")
            check_size(shard_uri, size, shard.get("size"), REPAIR_HINT)
