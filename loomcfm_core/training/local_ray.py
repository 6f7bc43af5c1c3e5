"""The Ray a command uses (:func:`connect`: ``ray.address``, or a local Ray it starts for itself), and that local
Ray: started offline, recorded, and never left behind.

``ray.init()`` without an address starts a head node (GCS, raylet, dashboard, and the raylet's dashboard
and runtime-env agents) as children of this process. A normal exit shuts it down, but a killed driver
(``kill -9``, a lost terminal) leaves the two agents running, and they ignore SIGTERM. So the processes of
every local Ray we start are recorded in ``~/.cache/loomcfm/ray/<pid>.json`` (host, pid and start time of
each), and:

- :func:`stop_local_ray` (on SIGTERM/SIGINT and at the end of the command) shuts Ray down and kills what
  is left of the recorded processes;
- :func:`start_local_ray` first cleans up after earlier commands whose process is gone.

The processes are found with psutil (children of this process, their start times).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loomcfm_core.errors import UsageError
from loomcfm_core.offline import stay_offline
from loomcfm_core.processes import Holder, descendants, kept_signal_handlers, start_time

if TYPE_CHECKING:
    from loomcfm_core.config import RayConfig

RECORDS = Path("~/.cache/loomcfm/ray")
# The environment a local Ray starts with (its processes and workers inherit it): Ray Train's watcher of node
# drains (ray/train/v2/_internal/callbacks/preemption_callback.py) only logs the drains a cloud provider
# announces, none of which can happen to one machine, and its start logs an error-level core_worker.cc line
# about its constructor arguments.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
GRACE_SECONDS = 5.0
log = logging.getLogger(__name__)


def _records() -> Path:
    return RECORDS.expanduser()


def _kill(processes: list[Holder]) -> list[Holder]:
    """SIGTERM every process still alive (same pid and start time), SIGKILL what is left after a grace
    period; returns the processes that were alive."""
    alive = [p for p in processes if p.alive()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in alive:
            try:
                os.kill(process.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + GRACE_SECONDS
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(p.alive() for p in alive):
            time.sleep(0.1)
    return alive


def record_processes(before: frozenset[int] = frozenset()) -> Path:
    """Write (or refresh) this process's record of the local Ray it started: every descendant now but those
    in ``before`` (what ran before ``ray.init``: a server a test or a notebook started is not Ray's, and
    :func:`stop_local_ray` must not kill it)."""
    me = Holder.me()
    processes = [Holder(me.host, pid, started) for pid in descendants(me.pid)
                 if pid not in before and (started := start_time(pid)) is not None]
    path = _records() / f"{me.pid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"owner": me.to_dict(), "processes": [p.to_dict() for p in processes]}))
    os.replace(tmp, path)
    return path


def clean_orphans() -> list[Holder]:
    """Kill the recorded Ray processes of earlier commands on this host whose owner is gone, and the workers
    they started; returns them."""
    cleaned = []
    for path in sorted(_records().glob("*.json")) if _records().is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        owner = Holder.from_dict(record.get("owner", {}))
        if not owner.local or owner.alive():
            continue
        recorded = [Holder.from_dict(p) for p in record.get("processes", [])]
        # and the Ray workers the raylet started after the record (a training's, which may be writing)
        workers = [Holder(owner.host, pid, started) for p in recorded if p.alive() for pid in descendants(p.pid)
                   if (started := start_time(pid)) is not None]
        killed = _kill([*recorded, *workers])
        if killed:
            log.warning("killed %d Ray processes left behind by %s (which is gone): %s", len(killed), owner,
                        ", ".join(str(p.pid) for p in killed))
        cleaned += killed
        path.unlink(missing_ok=True)
    return cleaned


def start_local_ray(**init_kwargs) -> None:
    """Start a local Ray for this process (after cleaning up what killed commands left) and record it. Its
    processes, and every worker they start, inherit this process's environment, made offline first
    (:mod:`loomcfm_core.offline`), with :data:`LOCAL_RAY_ENV`."""
    import ray

    from loomcfm_core.training.ray_trainer import quiet_token_notice  # Ray's private logger: its adapter's

    clean_orphans()
    stay_offline()
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)  # a user's own choice stands
    quiet_token_notice()
    before = frozenset(descendants(os.getpid()))
    ray.init(**init_kwargs)
    record_processes(before)


def stop_local_ray() -> None:
    """Shut down the local Ray this process started and kill what survives of it (the agents ignore SIGTERM
    and outlive a raylet that is killed rather than stopped)."""
    import ray

    path = _records() / f"{os.getpid()}.json"
    recorded = []
    if path.is_file():
        recorded = [Holder.from_dict(p) for p in json.loads(path.read_text()).get("processes", [])]
    if ray.is_initialized():
        ray.shutdown()
    _kill(recorded)
    path.unlink(missing_ok=True)


def check_local_resources(settings: RayConfig, available: dict) -> None:
    """On a local Ray nothing can scale up: fail now rather than wait forever for workers that cannot start.

    Args:
        settings: the ``ray`` section.
        available: the local Ray's ``ray.cluster_resources()``.
    """
    cpus = settings.num_workers * settings.cpus_per_worker
    if cpus > available.get("CPU", 0):
        raise UsageError(f"ray.num_workers={settings.num_workers} x ray.cpus_per_worker={settings.cpus_per_worker} "
                         f"needs {cpus:g} CPUs, the local Ray has {available.get('CPU', 0):g}")
    if settings.use_gpu and settings.num_workers > available.get("GPU", 0):
        raise UsageError(f"ray.use_gpu with ray.num_workers={settings.num_workers} needs that many GPUs, the local "
                         f"Ray has {available.get('GPU', 0):g}")


def connect(settings: RayConfig) -> None:
    """Join ``ray.address`` (or start a local Ray, recorded and stopped by the CLI on signals and at exit),
    checking that a local one can run the workers asked for.

    ``ray.init`` replaces the SIGTERM handler with its own ``sys.exit(15)`` (``ray/_private/worker.py``,
    ``init``'s ``sigterm_handler``), which would end every later stage of the command without its MLflow run
    ending KILLED, its lease released or its local Ray stopped; the handlers that were there are put back.
    """
    import ray

    if not ray.is_initialized():
        with kept_signal_handlers():
            if settings.address is None:
                start_local_ray(logging_level=logging.WARNING)
            else:
                ray.init(address=settings.address, logging_level=logging.WARNING)
    if settings.address is None:
        check_local_resources(settings, ray.cluster_resources())
