"""One interface over local folders and S3-compatible object stores, addressed by URI.

Stages only ever see URIs (``/data/x``, ``file:///data/x``, ``s3://bucket/prefix/x``) so the same code runs
on a laptop and on a cluster. Every write is atomic, so a reader (or a crashed writer's successor) never
mistakes a partial object for a complete one: on local disk through a temporary file and a rename; on S3 by
S3 itself, which never shows an object before its PUT, or its multipart upload's completion, succeeded, so
the bytes go up once, straight to their key (a failed multipart upload is aborted by boto3's transfer).
S3 endpoint and credentials come from the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), which is all MinIO or any other S3-compatible store needs.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

from loomcfm_core.errors import PERMANENT_ERRNOS, StorageError, StorageUnavailable, UriError

MULTIPART_THRESHOLD = 64 * 1024 * 1024
# Every S3 call: a connection within S3_CONNECT_TIMEOUT s, each socket read within S3_READ_TIMEOUT s (a wait
# for bytes, not for a whole transfer), S3_MAX_ATTEMPTS tries with botocore's backoff (at most 1 + 2 + 4 s):
# an endpoint that stops answering is named in under a minute, not after 16 minutes of silent retries.
S3_CONNECT_TIMEOUT, S3_READ_TIMEOUT, S3_MAX_ATTEMPTS = 5, 10, 4
TRANSIENT_CODES = ("InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "500", "502", "503", "504")

# The URI forms every location takes (``storage.root``, ``data.uri``, ``--ckpt`` ...), defined here only.
S3_PREFIX, FILE_PREFIX = "s3://", "file://"
URI_FORMS = "a local path, file:///absolute/path or s3://bucket/prefix"
LOCAL_FORMS = "a local path or file:///absolute/path"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]*$")


def check_uri(uri: str, *, local: bool = False) -> str:
    """``uri`` when it is one of the forms storage takes, else a :class:`UriError` saying what is expected.

    A location that looks like a URI but is not one of ours (``S3://b``, ``s3:/b``, ``http://x``) is refused
    rather than read as a local folder named ``s3:``, which would silently write where nobody looks.

    Args:
        local: only local forms are allowed (node-local folders such as ``data.local_cache``).
    """
    forms = LOCAL_FORMS if local else URI_FORMS
    if not isinstance(uri, str) or not uri.strip():
        raise UriError(f"{uri!r} is not a storage URI; expected {forms}")
    scheme = _SCHEME.match(uri)
    if scheme is None:
        return uri
    name, why = scheme.group(1), ""
    if uri.startswith(S3_PREFIX):
        bucket = urlparse(uri).netloc
        if _BUCKET.match(bucket) and not local:
            return uri
        why = " (a node-local folder, not object storage)" if local else \
            f" (bucket name {bucket!r}: lower-case letters, digits, '.' or '-')"
    elif uri.startswith(FILE_PREFIX):
        parsed = urlparse(uri)
        if parsed.netloc in ("", "localhost") and parsed.path.startswith("/"):
            return uri
        why = " (file:// takes an absolute path: file:///data/x)"
    elif name.lower() in ("s3", "file"):
        prefix = f"{name.lower()}://"
        why = f" (the scheme is {prefix} in lower case)" if uri.lower().startswith(prefix) else \
            f" (missing '/': {prefix} then {'a bucket' if name.lower() == 's3' else 'an absolute path'})"
    raise UriError(f"{uri!r} is not a storage URI{why}; expected {forms}")


def join(uri: str, *parts: str) -> str:
    """Append path parts to a URI with single slashes, whatever the scheme."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def is_remote(uri: str) -> bool:
    return check_uri(uri).startswith(S3_PREFIX)


def absolute(uri: str) -> str:
    """Make a local URI absolute, so it means the same thing to another process with another cwd."""
    return uri if is_remote(uri) else str(to_local_path(uri).resolve())


class Storage:
    """The operations every backend offers; get one with :func:`storage_for`."""

    def exists(self, uri: str) -> bool:
        raise NotImplementedError

    def list(self, uri: str) -> list[str]:
        """URIs of all objects under a prefix/folder (recursively), sorted."""
        raise NotImplementedError

    def size(self, uri: str) -> int | None:
        """The size in bytes of one object, None when there is none."""
        raise NotImplementedError

    def get(self, uri: str, local_path: str | Path) -> Path:
        """Copy an object to a local file (atomically) and return its path."""
        raise NotImplementedError

    def put(self, local_path: str | Path, uri: str) -> str:
        """Copy a local file to ``uri`` atomically and return the URI."""
        raise NotImplementedError

    def delete(self, uri: str) -> None:
        """Delete one object, or everything under a prefix; deleting what is not there is fine."""
        raise NotImplementedError

    def read_text(self, uri: str) -> str:
        raise NotImplementedError

    def abort_uploads(self, uri: str) -> int:
        """Abort the unfinished uploads of an object, or of everything under a folder (a writer killed
        mid-upload); returns how many."""
        return 0  # no uploads on a filesystem: a killed local write leaves a hidden .<name>.tmp-* file at most

    def write_text(self, uri: str, text: str) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "object"
            path.write_text(text)
            return self.put(path, uri)


def to_local_path(uri: str) -> Path:
    """The filesystem path of a plain path or ``file://`` URI."""
    check_uri(uri, local=True)
    return Path(urlparse(uri).path if uri.startswith(FILE_PREFIX) else uri).expanduser()


def _atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a temporary sibling, so ``dst`` is whole or absent.

    Raises:
        StorageError: the disk is full, read-only or forbids the write (what no retry cures), naming ``dst``;
            the temporary file is removed.
    """
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as fh:  # on disk before the rename makes it visible: a crash leaves no empty file
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    except OSError as exc:
        if exc.errno not in PERMANENT_ERRNOS:
            raise
        raise StorageError(f"{dst}: cannot write it ({exc.strerror}); nothing was written") from exc
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class LocalStorage(Storage):
    def exists(self, uri: str) -> bool:
        return to_local_path(uri).exists()

    def size(self, uri: str) -> int | None:
        path = to_local_path(uri)
        return path.stat().st_size if path.is_file() else None

    def list(self, uri: str) -> list[str]:
        root = to_local_path(uri)
        if root.is_file():
            return [uri]
        prefix = uri.rstrip("/")
        return sorted(f"{prefix}/{p.relative_to(root).as_posix()}" for p in root.rglob("*")
                      if p.is_file() and ".tmp-" not in p.name)

    def get(self, uri: str, local_path: str | Path) -> Path:
        src = to_local_path(uri)
        if not src.is_file():
            raise StorageError(f"{uri}: no such file")
        local_path = Path(local_path)
        _atomic_copy(src, local_path)
        return local_path

    def put(self, local_path: str | Path, uri: str) -> str:
        _atomic_copy(Path(local_path), to_local_path(uri))
        return uri

    def delete(self, uri: str) -> None:
        path = to_local_path(uri)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def read_text(self, uri: str) -> str:
        path = to_local_path(uri)
        if not path.is_file():
            raise StorageError(f"{uri}: no such file")
        return path.read_text()


class S3Storage(Storage):
    """boto3 with retries for transient errors (throttling, 5xx, dropped connections)."""

    def __init__(self) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config as BotoConfig

        self.client = boto3.session.Session().client(
            "s3", config=BotoConfig(retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
                                    connect_timeout=S3_CONNECT_TIMEOUT, read_timeout=S3_READ_TIMEOUT))
        self.transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                                       multipart_chunksize=MULTIPART_THRESHOLD)

    @staticmethod
    def split(uri: str) -> tuple[str, str]:
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"{uri}: expected s3://bucket/key")
        return parsed.netloc, parsed.path.lstrip("/")

    def _call(self, uri: str, fn, *args, **kwargs):
        """Run a boto3 call, turning its errors into ones that say what to fix."""
        from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, NoCredentialsError, \
            ReadTimeoutError

        bucket, _ = self.split(uri)
        try:
            return fn(*args, **kwargs)
        except NoCredentialsError as exc:
            raise StorageError(f"{uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for MinIO/other S3 stores)") from exc
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "NoSuchBucket" or (code == "404" and exc.operation_name == "HeadBucket"):
                endpoint = self.client.meta.endpoint_url
                raise StorageError(f"{uri}: bucket {bucket!r} does not exist at {endpoint}") from exc
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                raise StorageError(f"{uri}: S3 refused the credentials ({code}); check AWS_ACCESS_KEY_ID / "
                                   "AWS_SECRET_ACCESS_KEY and the bucket policy") from exc
            if code in ("NoSuchKey", "404"):
                raise StorageError(f"{uri}: no such object") from exc
            error = StorageUnavailable if code in TRANSIENT_CODES else StorageError
            raise error(f"{uri}: S3 error {code}: {exc}") from exc
        except (ConnectTimeoutError, ReadTimeoutError) as exc:
            what, seconds = (("connect", S3_CONNECT_TIMEOUT) if isinstance(exc, ConnectTimeoutError)
                             else ("answer", S3_READ_TIMEOUT))
            raise StorageUnavailable(f"{uri}: the S3 endpoint {self.client.meta.endpoint_url} did not {what} within "
                                     f"{seconds} s, {S3_MAX_ATTEMPTS} attempts (is it up? AWS_ENDPOINT_URL)") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"{uri}: S3 request failed after {S3_MAX_ATTEMPTS} attempts: {exc}") from exc

    def exists(self, uri: str) -> bool:
        bucket, key = self.split(uri)
        try:
            self._call(uri, self.client.head_object, Bucket=bucket, Key=key)
            return True
        except StorageError as exc:
            if "no such object" in str(exc):
                self._call(uri, self.client.head_bucket, Bucket=bucket)  # a missing bucket is an error
                return False
            raise

    def size(self, uri: str) -> int | None:
        bucket, key = self.split(uri)
        try:
            return self._call(uri, self.client.head_object, Bucket=bucket, Key=key)["ContentLength"]
        except StorageError as exc:
            if "no such object" in str(exc):
                return None
            raise

    def list(self, uri: str) -> list[str]:
        bucket, key = self.split(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        out = []
        pages = self._call(uri, lambda: list(self.client.get_paginator("list_objects_v2")
                                             .paginate(Bucket=bucket, Prefix=prefix)))
        for page in pages:
            out += [f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", [])]
        if not out and key and self.exists(uri):
            return [uri]
        return sorted(out)

    def get(self, uri: str, local_path: str | Path) -> Path:
        bucket, key = self.split(uri)
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_path.with_name(f".{local_path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            self._call(uri, self.client.download_file, bucket, key, str(tmp), Config=self.transfer)
            os.replace(tmp, local_path)
        finally:
            tmp.unlink(missing_ok=True)
        return local_path

    def put(self, local_path: str | Path, uri: str) -> str:
        """One PUT, or one multipart upload above ``MULTIPART_THRESHOLD``, straight to the key: the object
        appears whole when the upload completes, or not at all."""
        bucket, key = self.split(uri)
        self._call(uri, self.client.upload_file, str(local_path), bucket, key, Config=self.transfer)
        return uri

    def delete(self, uri: str) -> None:
        bucket, _ = self.split(uri)
        for obj in self.list(uri):
            self._call(obj, self.client.delete_object, Bucket=bucket, Key=self.split(obj)[1])

    def read_text(self, uri: str) -> str:
        bucket, key = self.split(uri)
        body = self._call(uri, self.client.get_object, Bucket=bucket, Key=key)["Body"]
        return body.read().decode()

    def abort_uploads(self, uri: str) -> int:
        """S3 keeps (and bills) the parts of a multipart upload whose writer was killed until it is aborted."""
        bucket, key = self.split(uri)
        pages = self._call(uri, lambda: list(self.client.get_paginator("list_multipart_uploads")
                                             .paginate(Bucket=bucket, Prefix=key)))
        uploads = [u for page in pages for u in page.get("Uploads", [])  # the object, or a folder's objects
                   if u["Key"] == key or u["Key"].startswith(key.rstrip("/") + "/")]
        for upload in uploads:
            self._call(uri, self.client.abort_multipart_upload, Bucket=bucket, Key=upload["Key"],
                       UploadId=upload["UploadId"])
        return len(uploads)


@cache
def _s3(endpoint: str | None, access_key: str | None) -> S3Storage:
    """One client per endpoint and identity: boto3 clients are thread-safe and costly to build."""
    return S3Storage()


def storage_for(uri: str) -> Storage:
    """The backend for a URI (:func:`check_uri`): ``s3://`` goes to S3, plain paths and ``file://`` to the
    local disk."""
    if is_remote(uri):
        return _s3(os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ACCESS_KEY_ID"))
    return LocalStorage()
