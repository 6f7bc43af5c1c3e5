import re
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
import requests

from loomcfm_core import storage
from loomcfm_core.errors import UriError
from loomcfm_core.storage import StorageError, StorageUnavailable, check_uri, join, storage_for


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "file":
        return f"file://{tmp_path}/store"
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/prefix"


def test_round_trip(root, tmp_path):
    store = storage_for(root)
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x00\x01payload" * 1000)
    uri = join(root, "a", "b.bin")
    assert not store.exists(uri)
    store.put(src, uri)
    assert store.exists(uri)
    out = store.get(uri, tmp_path / "dl" / "b.bin")
    assert out.read_bytes() == src.read_bytes()
    store.write_text(join(root, "a", "c.txt"), "hello")
    assert store.read_text(join(root, "a", "c.txt")) == "hello"
    assert store.list(join(root, "a")) == [join(root, "a", "b.bin"), join(root, "a", "c.txt")]
    assert store.list(join(root, "a", "c.txt")) == [join(root, "a", "c.txt")]
    store.delete(join(root, "a", "b.bin"))
    assert not store.exists(uri) and store.exists(join(root, "a", "c.txt"))
    store.delete(join(root, "a"))
    assert store.list(join(root, "a")) == []


def test_missing_object(root, tmp_path):
    store = storage_for(root)
    with pytest.raises(StorageError, match="no such"):
        store.read_text(join(root, "nope.txt"))
    with pytest.raises(StorageError, match="no such"):
        store.get(join(root, "nope.bin"), tmp_path / "x")


def test_multipart_put(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    storage._s3.cache_clear()
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (12 * 1024 * 1024 // 256))
    uri = f"s3://{s3_bucket}/big.bin"
    store = storage_for(uri)
    store.put(big, uri)
    head = store.client.head_object(Bucket=s3_bucket, Key="big.bin")
    assert head["ContentLength"] == big.stat().st_size
    assert "-" in head["ETag"], "a file above the threshold goes up in parts"
    assert store.get(uri, tmp_path / "back.bin").read_bytes() == big.read_bytes()
    storage._s3.cache_clear()


def test_put_leaves_no_temporary_objects(s3_bucket, tmp_path):
    src = tmp_path / "x"
    src.write_text("x")
    storage_for("s3://b").put(src, f"s3://{s3_bucket}/d/x")
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["d/x"]


def test_failed_put_never_shows_a_partial_object(s3_bucket, tmp_path, monkeypatch):
    """The bytes go up once, straight to the key: a multipart upload that fails after its first part shows
    no object, and boto3's transfer aborts the upload (no parts left behind)."""
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    storage._s3.cache_clear()
    store = storage_for(f"s3://{s3_bucket}")
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (12 * 1024 * 1024 // 256))
    parts, upload_part = [], store.client.upload_part

    def connection_lost_after_one_part(**kwargs):
        parts.append(kwargs["PartNumber"])
        if len(parts) > 1:
            raise RuntimeError("connection lost during the upload")
        return upload_part(**kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(store.client, "upload_part", connection_lost_after_one_part)
        with pytest.raises(RuntimeError):
            store.put(big, f"s3://{s3_bucket}/obj")
    assert len(parts) > 1 and not store.exists(f"s3://{s3_bucket}/obj")
    s3 = boto3.client("s3")
    assert s3.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
    assert not s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"), "the failed upload was aborted"
    storage._s3.cache_clear()


def test_the_unfinished_uploads_a_killed_writer_left_are_aborted_and_no_others(s3_bucket, tmp_path):
    """What ``kill -9`` mid multipart upload leaves (S3 keeps its parts until aborted): the next writer of that
    object or folder aborts it (``training/driver.py``, under the run folder's lease); other keys' stay."""
    s3 = boto3.client("s3")
    for key in ("run/checkpoints/step-1.pt", "run/converge.pt", "run/checkpoints-other/x", "elsewhere/y"):
        upload = s3.create_multipart_upload(Bucket=s3_bucket, Key=key)
        s3.upload_part(Bucket=s3_bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024)
    store = storage_for(f"s3://{s3_bucket}")
    assert store.abort_uploads(f"s3://{s3_bucket}/run/checkpoints") == 1
    assert store.abort_uploads(f"s3://{s3_bucket}/run/converge.pt") == 1
    assert store.abort_uploads(f"s3://{s3_bucket}/run/checkpoints") == 0
    left = sorted(u["Key"] for u in s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"])
    assert left == ["elsewhere/y", "run/checkpoints-other/x"]
    assert storage_for(str(tmp_path)).abort_uploads(str(tmp_path)) == 0


def test_failed_local_put_keeps_old_content(tmp_path, monkeypatch):
    store = storage_for(str(tmp_path))
    dst = tmp_path / "store" / "obj"
    store.write_text(str(dst), "old")

    def broken_copy(src, dst):
        open(dst, "w").write("par")
        raise OSError("disk full")

    monkeypatch.setattr(storage.shutil, "copyfile", broken_copy)
    with pytest.raises(OSError):
        store.write_text(str(dst), "new content")
    assert dst.read_text() == "old"
    assert [p.name for p in dst.parent.iterdir()] == ["obj"]


def test_missing_bucket_is_named(s3_env):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage_for("s3://no-such-bucket").read_text("s3://no-such-bucket/x")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage_for("s3://no-such-bucket").exists("s3://no-such-bucket/x")


def test_missing_credentials_are_named(moto_server, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID"):
        storage_for("s3://b").read_text("s3://b/x")


class _Flaky(BaseHTTPRequestHandler):
    """A proxy to moto that answers 503 to the first ``failures`` requests."""

    failures = 0
    upstream = ""
    seen = 0

    def _handle(self):
        cls = type(self)
        cls.seen += 1
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        if cls.failures > 0:
            cls.failures -= 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        resp = requests.request(self.command, cls.upstream + self.path, data=body, headers=headers,
                                allow_redirects=False)
        self.send_response(resp.status_code)
        for key, value in resp.headers.items():
            if key.lower() not in ("transfer-encoding", "connection", "content-encoding", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(resp.content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.content)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def log_message(self, *args):
        pass


def test_transient_errors_are_retried(s3_bucket, moto_server, monkeypatch, tmp_path):
    handler = type(f"Flaky{uuid.uuid4().hex[:6]}", (_Flaky,), {"upstream": moto_server, "failures": 3})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
        store = storage_for(f"s3://{s3_bucket}")
        store.write_text(f"s3://{s3_bucket}/retried.txt", "made it")
        assert handler.seen >= 4 and handler.failures == 0
        assert store.read_text(f"s3://{s3_bucket}/retried.txt") == "made it"
    finally:
        server.shutdown()


def test_a_stalled_endpoint_is_named(s3_env, monkeypatch):
    """An endpoint that takes connections and never answers, as a SIGSTOPped server does (the kernel still
    completes the handshake): the call gives up after its read timeout and attempts, naming the endpoint.
    Timeouts and attempts are made small here; the real ones bound the wait to under a minute."""
    monkeypatch.setattr(storage, "S3_READ_TIMEOUT", 1)
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        with pytest.raises(StorageUnavailable, match=rf"^s3://b/x: the S3 endpoint {endpoint} did not answer within "
                                                     r"1 s, 2 attempts \(is it up\? AWS_ENDPOINT_URL\)$"):
            storage_for("s3://b/x").exists("s3://b/x")


def test_unsupported_scheme():
    with pytest.raises(StorageError, match=r"'gs://bucket/x' is not a storage URI; expected a local path"):
        storage_for("gs://bucket/x")


@pytest.mark.parametrize("uri, why", [
    ("s3:/b/x", "missing '/': s3:// then a bucket"),
    ("S3://b/x", "the scheme is s3:// in lower case"),
    ("http://x/y", ""),
    ("gs://bucket/x", ""),
    ("file:/x", "missing '/': file:// then an absolute path"),
    ("file://host/x", "file:// takes an absolute path"),
    ("s3://My_Bucket/x", "bucket name 'My_Bucket'"),
    ("", ""),
])
def test_locations_that_are_not_storage_uris_are_refused(uri, why):
    """Nothing that looks like a URI is read as a local folder named after its scheme."""
    with pytest.raises(UriError, match=re.escape(f"{uri!r} is not a storage URI") + r".*expected a local path"):
        check_uri(uri)
    if why:
        with pytest.raises(UriError, match=re.escape(why)):
            storage_for(uri)


@pytest.mark.parametrize("uri", ["loomcfm-data", "/abs/x", "~/x", "file:///abs/x", "file://localhost/abs/x",
                                 "s3://bucket", "s3://my-bucket.data/prefix/x"])
def test_storage_uris_are_taken(uri):
    assert check_uri(uri) == uri


def test_node_local_folders_are_local_only():
    assert check_uri("/tmp/x", local=True) == "/tmp/x"
    with pytest.raises(UriError, match="a node-local folder, not object storage"):
        check_uri("s3://bucket/x", local=True)
