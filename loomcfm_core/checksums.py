"""Files used only once their sha256 matches the expected one, hashed once per file version.

Dataset shards (against the manifest), feature-network and autoencoder weights (against the configured hash
or the ``.sha256`` beside them, :func:`expected_sha256`) are checked here, so a torn, stale, modified or
substituted copy is never read. Hashing a large shard on every read would cost more than the read, so a
node-local record remembers the digest of each verified file version — its path, size, modification time and
inode — and a file is hashed again only when one of those changes (a rewrite, a truncation, a copy over it).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from loomcfm_core.errors import LoomcfmError, StorageError
from loomcfm_core.storage import storage_for

RECORD_FILE = "verified-files.json"


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    """The hex sha256 of a local file, read in blocks (shards and weights are too big to read whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def expected_sha256(uri: str, configured: str | None, *, name: str, key: str, hint: str = "",
                    error: type[LoomcfmError] = StorageError) -> str:
    """The sha256 (or prefix) the file at ``uri`` must have: the configured one, else its ``.sha256`` sidecar.

    Args:
        name: what the error calls the file, e.g. ``eval.inception_weights=<uri>``.
        key: the config key that sets the hash, named in the error when there is none.
        hint: appended to the sidecar's mention: what writes it.
    """
    if configured:
        return configured.lower()
    sidecar = uri + ".sha256"
    if storage_for(sidecar).exists(sidecar):
        return storage_for(sidecar).read_text(sidecar).split()[0].lower()
    raise error(f"{name}: no hash to check it against; set {key} or keep the {sidecar}{hint}")


def _version(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"


def _read_record(record: Path) -> dict[str, list[str]]:
    try:
        return json.loads(record.read_text())
    except (OSError, ValueError):  # none yet, or a torn one from a killed writer: hashing again is safe
        return {}


def file_sha256(path: Path, record_dir: str | Path | None) -> str:
    """The sha256 of a local file, from the record in ``record_dir`` when this version was hashed before.

    The record is updated by an atomic replace, so concurrent readers (DataLoader workers, ranks) at worst
    hash a file twice; a record entry is only ever used for the exact (path, size, mtime, inode) it was made for.

    Args:
        record_dir: the node-local folder of the record (``data.local_cache``); None hashes every time.
    """
    if record_dir is None:
        return sha256_file(path)
    record = Path(record_dir).expanduser() / RECORD_FILE
    key, version = str(path.resolve()), _version(path)
    known = _read_record(record).get(key)
    if known and known[0] == version:
        return known[1]
    digest = sha256_file(path)
    if _version(path) == version:  # not changed while it was being read
        entries = _read_record(record)
        entries[key] = [version, digest]
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{record.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, record)
    return digest


def check_size(label: str, actual: int, expected: int | None, hint: str = "",
               error: type[LoomcfmError] = StorageError) -> None:
    """Raise ``error`` when a file's size is not the recorded one (None: nothing recorded to compare)."""
    if expected is not None and actual != expected:
        raise error(f"{label}: size mismatch: {actual} bytes, expected {expected} (truncated or rewritten)"
                    + (f"; {hint}" if hint else ""))


def verify_file(path: Path, expected: str, *, size: int | None = None, record_dir: str | Path | None = None,
                name: str | None = None, hint: str = "", error: type[LoomcfmError] = StorageError) -> Path:
    """``path`` when it exists, has ``size`` bytes (when given: a cheap check done every time) and a sha256
    starting with ``expected`` (a full digest or a prefix); otherwise ``error`` saying which and ``hint``.

    Args:
        name: what the message calls the file (default: the path), e.g. the shard's URI or a config key.
    """
    label, tail = name or str(path), f"; {hint}" if hint else ""
    if not path.is_file():
        raise error(f"{label}: missing{tail}")
    check_size(label, path.stat().st_size, size, hint, error)
    actual = file_sha256(path, record_dir)
    if not actual.startswith(expected):
        raise error(f"{label}: checksum mismatch: sha256 {actual} does not match the expected {expected}{tail}")
    return path


def fetch_verified(uri: str, local: Path, expected: str, *, size: int | None = None,
                   record_dir: str | Path | None = None, name: str | None = None, hint: str = "",
                   error: type[LoomcfmError] = StorageError) -> Path:
    """``local``, a verified copy of ``uri`` (:func:`verify_file`).

    A copy already there that verifies is reused; anything else is downloaded again. A download that does
    not verify is deleted before raising, so the next attempt starts clean.
    """
    try:
        return verify_file(local, expected, size=size, record_dir=record_dir)
    except LoomcfmError:
        pass
    storage_for(uri).get(uri, local)
    try:
        return verify_file(local, expected, size=size, record_dir=record_dir, name=name or uri, hint=hint,
                           error=error)
    except LoomcfmError:
        local.unlink(missing_ok=True)
        raise
