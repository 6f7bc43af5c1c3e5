"""Running ``loomcfm`` as a user types it: a subprocess with its own HOME, working folder and session, or
in this process (:func:`call`) where a test is about what the command says, not about its process."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from loomcfm_core.processes import start_time

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


class Command:
    """A running ``loomcfm``: its output goes to files (a pipe nobody reads would fill up and stop it)."""

    def __init__(self, args: list[str], cwd: Path, extra_env: dict[str, str], prefix: list[str] = ()) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        logs = cwd / "logs"
        logs.mkdir(exist_ok=True)
        stem = logs / f"{time.monotonic_ns()}"
        self.out_path, self.err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "loomcfm_core.cli", *args], cwd=cwd,
                                         env=env(cwd / "home", **extra_env), stdout=out, stderr=err,
                                         start_new_session=True)
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    @property
    def stderr(self) -> str:
        """What it wrote to stderr so far."""
        return self.err_path.read_text(errors="replace")

    def finish(self, timeout: float = 600) -> subprocess.CompletedProcess:
        """Wait for it (killing its whole session on a timeout) and return its exit code and output."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode,
                                           self.out_path.read_text(errors="replace"), self.stderr)


def start(*args: str, cwd: Path, prefix: list[str] = (), **extra_env: str) -> Command:
    """``loomcfm <args>`` in its own session (so a test can signal it and find what it left behind), run by
    ``prefix`` (a command that ends by running its arguments) when one is given."""
    return Command(list(args), cwd, extra_env, list(prefix))


def run(*args: str, cwd: Path, timeout: float = 600, prefix: list[str] = (), **extra_env: str) \
        -> subprocess.CompletedProcess:
    return start(*args, cwd=cwd, prefix=prefix, **extra_env).finish(timeout)


def call(*args: str) -> subprocess.CompletedProcess:
    """``loomcfm <args>`` in this process (``cli.main``): its exit code and what it wrote to stdout and stderr,
    without the seconds a new process spends importing torch, MLflow and Ray. What it writes is taken from the
    file descriptors (a library's own writes, and a local Ray's, count), so it works in a fixture of any scope.
    The command's logging setup and SIGTERM handler are this process's again after it; its working folder and
    HOME are the test's (``conftest._isolated_home``) or the fixture's."""
    from loomcfm_core.cli import main

    forget_ray_token()
    root = logging.getLogger()
    handlers, level, sigterm = root.handlers[:], root.level, signal.getsignal(signal.SIGTERM)
    streams = sys.stdout, sys.stderr
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        for stream in streams:
            stream.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        # never closed: a library may keep a handler on them (Ray's loggers do), writing into the unlinked file
        sys.stdout, sys.stderr = (io.TextIOWrapper(os.fdopen(os.dup(fd), "wb"), write_through=True) for fd in (1, 2))
        try:
            code = main(list(args))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = streams
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            root.handlers[:] = handlers
            root.setLevel(level)
            signal.signal(signal.SIGTERM, sigterm)
        texts = []
        for file in (out, err):
            file.seek(0)
            texts.append(file.read().decode(errors="replace"))
    return subprocess.CompletedProcess(["loomcfm", *args], code, *texts)


def forget_ray_token() -> None:
    """Ray 2.60 gives a new local Ray a token in ``~/.ray/auth_token`` and caches it in the process
    (``ray/_private/authentication/authentication_token_setup.py``); HOME is per test here, so the next
    ``ray.init`` of this process must read (or write) the token of its own HOME, as its GCS does."""
    if "ray" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader

        AuthenticationTokenLoader.instance().reset_cache()


@contextmanager
def inside(folder: Path):
    """Working folder and HOME (``folder/home``) of a command :func:`call` runs in a fixture wider than one
    test, which ``conftest._isolated_home`` does not reach."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(folder / "home"))
        patch.chdir(folder)
        yield folder


def on_small_disk(folder: Path, size: str) -> list[str]:
    """A prefix that runs the command with a tmpfs of ``size`` (``mount -o size=``, e.g. ``1m``) mounted on
    ``folder`` in a mount namespace of its own (root, as CI runs; util-linux ``unshare``): a real full disk.
    The mount goes away with the command, so what the command left on it is listed into ``<folder>.listing``
    (one ``find`` line per path) before it does."""
    folder.mkdir(parents=True, exist_ok=True)
    script = 'mount -t tmpfs -o "size=$1" tmpfs "$0" || exit 99; shift; "$@"; rc=$?; find "$0" > "$0.listing"; exit $rc'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(folder), size]


def ours(stderr: str) -> str:
    """stderr without the lines of Ray Train's ``PlacementGroupCleaner`` actor: on a host where another Ray
    cluster runs too (another test, another lane), its monitor thread dies with Ray's own traceback
    ("Found multiple active Ray instances", ``ray/train/v2/_internal/execution/controller/
    placement_group_cleaner.py`` ``_monitor_loop`` -> ``is_actor_alive``), whatever the command does."""
    return "\n".join(line for line in stderr.splitlines() if "(PlacementGroupCleaner pid=" not in line)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``loomcfm:`` line a failed command ends with (asserting there is exactly one, last, and no
    traceback)."""
    assert "Traceback" not in ours(proc.stderr), proc.stderr[-5000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("loomcfm:")]
    assert len(lines) == 1 and proc.stderr.rstrip().endswith(lines[0]), proc.stderr[-5000:]
    return lines[0]


def wait_for(predicate, command: Command | None = None, timeout: float = 900, what: str = "") -> None:
    """Poll ``predicate`` until it holds, failing early when ``command`` exits first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if command is not None and command.poll() is not None:
            raise AssertionError(f"exited with {command.poll()} before {what}: {command.stderr[-4000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def alive_in_session(sid: int) -> list[str]:
    """``pid command`` of every live process of a session (what a command started and left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid and start_time(int(entry.name)) is not None:  # not zombies
                    command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")[:80].decode(errors="replace")
                    found.append(f"{entry.name} {command}")
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                continue
    return found
