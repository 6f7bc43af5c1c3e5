"""Which process holds something, and whether it still lives: the one answer the run folder's lease, the
MLflow runs of stages and the local Ray a CLI started all rely on.

A process is identified by host, pid and start time (psutil reads them from the kernel): a pid alone is
reused, and a record naming a dead process must never make us act on an unrelated one that got its number.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import psutil


def start_time(pid: int) -> str | None:
    """The process's start time as text (what a record compares): seconds from boot to its start, which no
    clock adjustment changes (``create_time`` is boot time plus that, and the boot time follows the clock),
    None when no such process runs (none, or a zombie: dead, waiting for a parent to reap it — an init that
    does not reap keeps killed orphans as zombies); an empty string when the system does not say."""
    try:
        process = psutil.Process(pid)
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        return f"{process.create_time() - psutil.boot_time():.2f}"
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:
        return ""


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...); [] when it is gone."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@dataclass(frozen=True)
class Holder:
    """A process on a host, as recorded in a lease, an MLflow tag or a Ray record."""

    host: str
    pid: int
    started: str

    @classmethod
    def me(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), start_time(os.getpid()) or "")

    @classmethod
    def from_dict(cls, record: dict) -> Holder:
        return cls(str(record.get("host", "")), int(record.get("pid", -1)), str(record.get("started", "")))

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"

    @property
    def local(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool | None:
        """Whether the process runs: known only on its own host (None elsewhere: ask its heartbeat)."""
        if not self.local:
            return None
        started = start_time(self.pid)
        if started is None:
            return False
        return not (started and self.started and started != self.started)


def expired(heartbeat: float, ttl: float, now: float | None = None) -> bool:
    """Whether a heartbeat (seconds since the epoch) is older than ``ttl``."""
    return (now if now is not None else time.time()) - heartbeat > ttl


def gone(holder: Holder, heartbeat: float, ttl: float) -> bool:
    """A holder is gone when its process is dead (checked on its own host) or, elsewhere, when its heartbeat
    is older than ``ttl``."""
    alive = holder.alive()
    return not alive if alive is not None else expired(heartbeat, ttl)


@contextmanager
def kept_signal_handlers() -> Iterator[None]:
    """Put this process's SIGINT and SIGTERM handlers back after the body, for a library call that installs its
    own (``ray.init``'s ``sys.exit(15)``, Ray Train's ``fit``). Only the main thread has handlers."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


_stopped_by: list[str] = []


def stop_on_signal(signum: int, frame=None) -> None:
    """A signal handler that stops the main thread's work as Ctrl-C does (``KeyboardInterrupt``) and
    remembers which signal it was (:func:`stopped_by`): libraries in between may raise a fresh
    ``KeyboardInterrupt`` without the name."""
    name = signal.Signals(signum).name
    _stopped_by.append(name)
    raise KeyboardInterrupt(name)


def stopped_by() -> str:
    """The last signal :func:`stop_on_signal` handled (``SIGINT`` when none did: a plain Ctrl-C)."""
    return _stopped_by[-1] if _stopped_by else "SIGINT"
