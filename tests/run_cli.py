"""Running ``loomcfm`` as a user types it: a subprocess with its own HOME, working folder and session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# A digits network and run small enough for a CPU test, as ``--set`` overrides.
TINY = ["model.channels=32", "model.attn_resolutions=[]", "train.batch_size=32", "train.log_every=5",
        "train.warmup_steps=5", "ray.cpus_per_worker=1"]


def sets(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def store_sets(root: Path) -> list[str]:
    """Storage, the MLflow store and the node-local cache under ``root``."""
    return sets(f"storage.root={root / 'store'}", f"tracking.local_dir={root / 'runs'}",
                f"data.local_cache={root / 'node'}")


def env(home: Path, **extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out.update(HOME=str(home), **extra)
    return out


def start(*args: str, cwd: Path, **extra_env: str) -> subprocess.Popen:
    """``loomcfm <args>`` in its own session (so a test can signal it and find what it left behind)."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "loomcfm_core.cli", *args], cwd=cwd, env=env(cwd / "home", **extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def run(*args: str, cwd: Path, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    proc = start(*args, cwd=cwd, **extra_env)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``loomcfm:`` line a failed command ends with (asserting there is exactly one, last, and no
    traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("loomcfm:")]
    assert len(lines) == 1 and proc.stderr.rstrip().endswith(lines[0]), proc.stderr[-5000:]
    return lines[0]


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 400, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before {what}: {proc.stderr.read()[-4000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def alive_in_session(sid: int) -> list[str]:
    """``pid command`` of every process of a session (what a command started and left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")[:80].decode(errors="replace")
                    found.append(f"{entry.name} {command}")
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                continue
    return found
