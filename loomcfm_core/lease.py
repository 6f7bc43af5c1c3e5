"""One training per run folder: a lease object ``<run>/lease.json`` in storage, taken before training starts.

The lease names its holder (host, pid, start time) and is renewed by a heartbeat every third of its
lifetime (``train.lease_seconds``). A second training of the same folder fails at once naming the holder,
or waits for the folder with ``--wait``. A holder that died (``kill -9``, a lost node) leaves a lease that
is taken over — immediately when the holder is known dead (same host, process gone), else once its
heartbeat is older than the lifetime — and the new holder resumes from the latest checkpoint.

Every change is a compare-and-swap, so two processes can never both believe they hold the lease:

- S3: create with ``PutObject(IfNoneMatch='*')`` (a second create gets 412 Precondition Failed); renew,
  take over and release with ``IfMatch=<ETag>`` of the version read (another writer in between: 412).
  The heartbeat's age is the object's ``LastModified`` (the server's clock, not the holder's).
- local disk: create by hard-linking a complete temporary file to the name (``link`` fails if the name
  exists, like ``O_CREAT|O_EXCL``, and a reader never sees a half-written lease); renew, take over and
  release under an ``flock`` of ``lease.lock``, after checking the content is still the version read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path

from loomcfm_core.errors import LeaseError, StorageError
from loomcfm_core.processes import Holder, gone
from loomcfm_core.storage import is_remote, join, storage_for, to_local_path

LEASE_FILE = "lease.json"
log = logging.getLogger(__name__)

Version = tuple[str, str, float]  # (text, version tag, last modified: seconds since the epoch)


class _LocalObject:
    """The lease file on local disk; a version tag is the sha256 of the content."""

    def __init__(self, uri: str) -> None:
        self.path = to_local_path(uri)
        self.lock = self.path.with_name("lease.lock")

    @staticmethod
    def _tag(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    def read(self) -> Version | None:
        try:
            text, modified = self.path.read_text(), self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        return text, self._tag(text), modified

    def _write_aside(self, text: str) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(text)
        return tmp

    def create(self, text: str) -> str | None:
        tmp = self._write_aside(text)
        try:
            os.link(tmp, self.path)
            return self._tag(text)
        except FileExistsError:
            return None
        finally:
            tmp.unlink()

    def _swap(self, tag: str, text: str | None) -> str | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read()
            if current is None or current[1] != tag:
                return None
            if text is None:
                self.path.unlink()
                return tag
            os.replace(self._write_aside(text), self.path)
            return self._tag(text)

    def replace(self, tag: str, text: str) -> str | None:
        return self._swap(tag, text)

    def delete(self, tag: str) -> bool:
        return self._swap(tag, None) is not None


class _S3Object:
    """The lease object on S3; a version tag is the ETag."""

    LOST = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404")

    def __init__(self, uri: str) -> None:
        self.uri, self.store = uri, storage_for(uri)
        self.bucket, self.key = self.store.split(uri)

    def _send(self, fn, **kwargs) -> dict | None:
        """The reply, or None when S3 refused a condition (another writer won) or there is no object."""
        try:
            return self.store._call(self.uri, fn, Bucket=self.bucket, Key=self.key, **kwargs)
        except StorageError as exc:
            cause = exc.__cause__
            code = getattr(cause, "response", {}).get("Error", {}).get("Code", "")
            if code in self.LOST:
                return None
            raise

    def read(self) -> Version | None:
        reply = self._send(self.store.client.get_object)
        if reply is None:
            return None
        return reply["Body"].read().decode(), reply["ETag"], reply["LastModified"].timestamp()

    def create(self, text: str) -> str | None:
        reply = self._send(self.store.client.put_object, Body=text.encode(), IfNoneMatch="*")
        return reply and reply["ETag"]

    def replace(self, tag: str, text: str) -> str | None:
        reply = self._send(self.store.client.put_object, Body=text.encode(), IfMatch=tag)
        return reply and reply["ETag"]

    def delete(self, tag: str) -> bool:
        return self._send(self.store.client.delete_object, IfMatch=tag) is not None


def _object(uri: str) -> _LocalObject | _S3Object:
    return _S3Object(uri) if is_remote(uri) else _LocalObject(uri)


def check_held(run_uri: str, token: str) -> None:
    """Raise :class:`LeaseError` unless the run folder's lease is still the one with ``token``.

    The fence for writers that are not the lease holder: Ray workers, which may outlive a driver killed with
    ``kill -9`` by a few seconds, check it before each checkpoint, so they never write into a run folder that
    another training took over.
    """
    current = _object(join(run_uri, LEASE_FILE)).read()
    record = json.loads(current[0]) if current else {}
    if record.get("token") != token:
        holder = f"held by {Holder.from_dict(record['holder'])}" if record else "released"
        raise LeaseError(f"{run_uri}: the run folder's lease is no longer this training's ({holder}); "
                         "stopping without writing")


class Lease:
    """The lease of one run folder; use as a context manager around the training.

    Args:
        ttl: seconds after the last heartbeat when the lease counts as abandoned.
        wait: wait for a held lease to be released or to expire instead of failing.
        poll: seconds between looks at a held lease while waiting.
    """

    def __init__(self, run_uri: str, ttl: float, wait: bool = False, poll: float = 2.0) -> None:
        uri = join(run_uri, LEASE_FILE)
        self.run_uri, self.ttl, self.wait, self.poll = run_uri, ttl, wait, poll
        self.object = _object(uri)
        self.me, self.token, self.tag = Holder.me(), uuid.uuid4().hex, ""
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> str:
        return json.dumps({"holder": self.me.to_dict(), "token": self.token, "ttl": self.ttl,
                           "renewed": time.time()}, indent=2)

    def acquire(self) -> None:
        """Take the lease (creating it, or replacing an abandoned one); raise :class:`LeaseError` naming the
        holder when another live training holds it (or keep waiting with ``wait``)."""
        waited = False
        while True:
            self.tag = self.object.create(self._record()) or ""
            if self.tag:
                return
            current = self.object.read()
            if current is None:
                continue  # released between our create and our read
            text, tag, modified = current
            record = json.loads(text)
            holder = Holder.from_dict(record.get("holder", {}))
            if gone(holder, modified, float(record.get("ttl", self.ttl))):
                self.tag = self.object.replace(tag, self._record()) or ""
                if self.tag:
                    log.warning("%s: took over the lease of %s, which is gone (last heartbeat %.0f s ago)",
                                self.run_uri, holder, time.time() - modified)
                    return
                time.sleep(0.1)  # another process took it over first: look again
                continue
            if not self.wait:
                raise LeaseError(f"{self.run_uri} is being trained by {holder} (lease renewed "
                                 f"{time.time() - modified:.0f} s ago); one training per run folder: wait for it "
                                 "with `loomcfm train --wait`, or stop that training")
            if not waited:
                log.info("%s is being trained by %s: waiting for it (--wait)", self.run_uri, holder)
                waited = True
            time.sleep(self.poll)

    def _heartbeat(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.ttl / 3):
            try:
                tag = self.object.replace(self.tag, self._record())
                if tag:
                    self.tag, last_ok = tag, time.monotonic()
                    continue
                reason = "another training took it over"
            except StorageError as exc:  # a storage hiccup: keep trying until the lease would expire
                if time.monotonic() - last_ok < self.ttl:
                    log.warning("%s: lease heartbeat failed (%s); retrying", self.run_uri, exc)
                    continue
                reason = f"it could not be renewed for {self.ttl:.0f} s ({exc})"
            log.error("%s: lost the lease: %s; stopping this training", self.run_uri, reason)
            self.lost.set()
            # The training stops as on Ctrl-C, and says why (see __exit__). A real signal to the main thread,
            # not _thread.interrupt_main(): only a signal wakes a main thread blocked in a system call.
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            return

    def __enter__(self) -> Lease:
        self.acquire()
        self._thread = threading.Thread(target=self._heartbeat, name="loomcfm-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost.is_set():
            raise LeaseError(f"{self.run_uri}: this training lost its lease (another training took the run "
                             "folder over, or storage was unreachable for a whole lease lifetime) and stopped") from exc
        self.object.delete(self.tag)
