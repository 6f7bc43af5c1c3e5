"""The one checksum-verified fetch: reuse a good copy, replace a stale one, never keep a bad download."""

import hashlib

import pytest

from loomcfm_core.checksums import fetch_verified, sha256_file
from loomcfm_core.errors import MetricsError, StorageError


def test_sha256_file_reads_in_blocks(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10_000)
    assert sha256_file(path, block=333) == hashlib.sha256(b"x" * 10_000).hexdigest()


def test_fetch_reuses_a_good_copy_and_replaces_a_stale_one(tmp_path):
    remote = tmp_path / "remote.bin"
    remote.write_bytes(b"weights")
    digest = sha256_file(remote)
    local = tmp_path / "node" / "copy.bin"
    assert fetch_verified(str(remote), local, digest) == local and local.read_bytes() == b"weights"
    remote.write_bytes(b"changed at the source")  # a good local copy is not fetched again
    assert fetch_verified(str(remote), local, digest[:12]).read_bytes() == b"weights", "a prefix is enough"
    local.write_bytes(b"torn")  # a bad local copy is: here the source no longer matches either
    with pytest.raises(StorageError, match=rf"remote\.bin: checksum mismatch: sha256 [0-9a-f]{{64}} does not match "
                                           rf"the expected {digest}$"):
        fetch_verified(str(remote), local, digest)
    assert not local.exists(), "a download that does not match is not kept"


def test_mismatch_names_the_file_in_the_callers_terms(tmp_path):
    remote = tmp_path / "w.pth"
    remote.write_bytes(b"not inception")
    with pytest.raises(MetricsError, match=r"^eval.inception_weights=x: checksum mismatch: .* does not match the "
                                           r"expected 00000000; not the weights$"):
        fetch_verified(str(remote), tmp_path / "l.pth", "00000000", name="eval.inception_weights=x",
                       hint="not the weights", error=MetricsError)
    assert not (tmp_path / "l.pth").exists()
