"""Files fetched from storage onto this node, used only once their sha256 matches the expected one.

Dataset shards (against the manifest), feature-network and autoencoder weights (against the configured hash
or the ``.sha256`` beside them, :func:`expected_sha256`) go through :func:`fetch_verified`, so a torn, stale or
substituted copy is never read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from loomcfm_core.errors import LoomcfmError, StorageError
from loomcfm_core.storage import storage_for


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


def fetch_verified(uri: str, local: Path, expected: str, *, name: str | None = None, hint: str = "",
                   error: type[LoomcfmError] = StorageError) -> Path:
    """``local``, a copy of ``uri`` whose sha256 starts with ``expected`` (a full digest or a prefix of one).

    A copy already there that matches is reused; anything else is downloaded again. A download that does
    not match is deleted before raising, so the next attempt starts clean.

    Args:
        name: what the error message calls the file (default: ``uri``), e.g. the config key that names it.
        hint: appended to the error message: what a mismatch means and what to do about it.
        error: the class raised on a mismatch, so callers keep their own error domain.
    """
    if local.is_file() and sha256_file(local).startswith(expected):
        return local
    storage_for(uri).get(uri, local)
    actual = sha256_file(local)
    if not actual.startswith(expected):
        local.unlink()
        raise error(f"{name or uri}: checksum mismatch: sha256 {actual} does not match the expected {expected}"
                    + (f"; {hint}" if hint else ""))
    return local
