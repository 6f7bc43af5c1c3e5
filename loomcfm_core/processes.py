"""Which process holds something, and whether it still lives: the one answer the run folder's lease, the
MLflow runs of stages and the local Ray a CLI started all rely on.

A process is identified by host, pid and start time: a pid alone is reused by the kernel, and a record
naming a dead process must never make us act on an unrelated one that got its number.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), None when no
    such process runs (none, or a zombie: dead, waiting for a parent to reap it — an init that does not reap
    keeps killed orphans as zombies); an empty string where ``/proc`` is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may contain spaces
    return None if fields[0] in ("Z", "X") else fields[19]


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
