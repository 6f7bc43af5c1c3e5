"""What the containers of the simulated cluster do when no pod is a real host, and the Ray dashboard of each
simulated head.

A container's program follows from its command, as KubeRay v1.7.0 writes them (tests/k8s/raycluster_sim.py,
``common/job.go`` ``BuildJobSubmitCommand``): ``ray start --head`` brings its cluster's GCS and dashboard up
(``<cluster>-head-svc.<ns>.svc.cluster.local``), a worker's ``ray start`` runs, ``wait-gcs-ready`` ends once
that GCS is up, and the submitter's script waits for the dashboard, submits the RayJob's job unless it exists
(``ray job status``), then follows its logs to the end: ``ray job logs --follow`` prints the job's last words
(``ray/dashboard/modules/job/cli.py`` ``_log_job_status``) and exits 0 whatever the job's status, or fails when the
dashboard goes away. Any other command runs as a process on this machine with the container's environment. An
image in ``images`` with an ``exit_code`` crashes every container started from it; ``missing`` images do not
pull (containerd's error text).

The dashboard's jobs (``ray/dashboard/modules/job/job_manager.py``) are :class:`RayJobRun` records whose work is
an :class:`Attempt`; ``block(host)`` makes a dashboard unreachable while its head keeps running (a NetworkPolicy
or a mesh between the operator and port 8265).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol

from tests.k8s.apiserver import now

TERMINAL_JOB = ("STOPPED", "SUCCEEDED", "FAILED")  # rayjob_types.go IsJobTerminal


class Attempt(Protocol):
    """The Ray job of one attempt, as the dashboard sees it."""

    submission_fails: bool

    def start(self, command: str, env: dict[str, str], emit: Callable[[str], None]) -> None: ...

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...


@dataclass
class Scripted:
    """A Ray job that prints ``lines`` and ends with ``exit_code`` once ``hold`` (if any) is set; or, with
    ``submission_fails``, a submitter that never manages to submit (its Job fails: BackoffLimitExceeded)."""

    exit_code: int = 0
    lines: tuple[str, ...] = ("training...",)
    hold: threading.Event | None = None
    submission_fails: bool = False
    code: int | None = field(default=None, init=False)

    def start(self, command, env, emit):
        def run():
            for line in self.lines:
                emit(line)
            if self.hold is not None:
                self.hold.wait()
            if self.code is None:
                self.code = self.exit_code

        threading.Thread(target=run, daemon=True).start()

    def poll(self):
        return self.code

    def kill(self):
        self.code = -9
        if self.hold is not None:
            self.hold.set()


def _ms() -> int:
    return int(now().timestamp() * 1000)


@dataclass
class RayJobRun:
    """One Ray job on a (simulated) cluster: the dashboard's ``JobInfo``."""

    job_id: str
    cluster: str
    namespace: str
    pod: str
    rayjob: str
    attempt: Attempt
    number: int
    host: str = ""
    status: str = "PENDING"
    message: str = "Job has not started yet."
    start_ms: int = 0
    end_ms: int = 0
    lines: list[str] = field(default_factory=list)

    def finish(self, code: int) -> None:
        self.end_ms = _ms()
        if code == 0:
            self.status, self.message = "SUCCEEDED", "Job finished successfully."
            return
        tail = "\n".join(self.lines)[-20000:]
        self.status = "FAILED"
        self.message = (f"Job entrypoint command failed with exit code {code}, last available logs (truncated to "
                        f"20,000 chars):\n{tail}" if tail else
                        f"Job entrypoint command failed with exit code {code}. No logs available.")

    def info(self) -> dict:
        stamp = lambda ms: datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc)  # noqa: E731
        return {"status": self.status, "message": self.message, "start_time": self.start_ms, "end_time": self.end_ms,
                "startTime": stamp(self.start_ms) if self.start_ms else None,
                "endTime": stamp(self.end_ms) if self.end_ms else None}


class Unreachable(Exception):
    """The dashboard did not answer (connection refused, timed out)."""


class Dashboards:
    """The dashboards of the simulated heads, by the head Service's name; their jobs by submission id."""

    def __init__(self, attempt: Callable[[dict, int], Attempt], kill_when=None):
        self.attempt, self.kill_when = attempt, kill_when
        self.heads: set[str] = set()
        self.blocked: set[str] = set()
        self.runs: dict[str, RayJobRun] = {}
        self.attempts: dict[str, int] = {}  # RayJob uid -> Ray jobs started
        self.planned: dict[str, Attempt] = {}  # submission id -> its work, fixed at the first submitter's try
        self.lock = threading.RLock()

    def reachable(self, host: str) -> bool:
        return host in self.heads and host not in self.blocked

    def block(self, host: str) -> None:
        self.blocked.add(host)

    def info(self, host: str, job_id: str) -> dict | None:
        if not self.reachable(host):
            raise Unreachable(f"Failed to connect to Ray at address: http://{host}:8265")
        run = self.runs.get(job_id)
        return run.info() if run is not None and run.host == host else None

    def stop(self, job_id: str, host: str = "") -> None:
        """``POST /api/jobs/<id>/stop`` (``job_manager.py`` ``stop_job``)."""
        with self.lock:
            run = self.runs.get(job_id)
            if run is not None and run.status in ("PENDING", "RUNNING"):
                run.attempt.kill()
                run.status, run.message, run.end_ms = "STOPPED", "Job was intentionally stopped.", _ms()

    def down(self, host: str) -> None:
        """The head is gone, and with it the job supervisors of its jobs."""
        with self.lock:
            self.heads.discard(host)
            for run in self.runs.values():
                if run.host == host and run.status in ("PENDING", "RUNNING"):
                    run.attempt.kill()
                    run.status, run.message, run.end_ms = "FAILED", "Job failed: the cluster is gone.", _ms()

    def tick(self) -> None:
        with self.lock:
            for run in self.runs.values():
                if run.status != "RUNNING":
                    continue
                if self.kill_when is not None and self.kill_when(run):
                    run.attempt.kill()
                code = run.attempt.poll()
                if code is not None:
                    run.finish(code)


class Submitter:
    """KubeRay's submitter script against a simulated dashboard (the pod's ``RAY_DASHBOARD_ADDRESS`` and
    ``RAY_JOB_SUBMISSION_ID``)."""

    def __init__(self, sim, pod: dict, env: dict[str, str], log: Callable[[str], None]):
        self.sim, self.pod, self.log = sim, pod, log
        self.host = env["RAY_DASHBOARD_ADDRESS"].rsplit(":", 1)[0]
        self.job_id = env["RAY_JOB_SUBMISSION_ID"]
        self.rayjob = pod["metadata"]["labels"]["ray.io/originated-from-cr-name"]
        self.code: int | None = None
        self.run: RayJobRun | None = None
        self.shown = 0
        self.waited = False

    def step(self) -> int | None:
        dash = self.sim.dashboards
        if self.code is not None:
            return self.code
        if not dash.reachable(self.host):
            if self.run is not None:  # `ray job logs --follow` loses its connection
                self.log(f"ConnectionError: Failed to connect to Ray at address: http://{self.host}:8265.")
                self.code = 1
            elif not self.waited:
                self.log(f"Waiting for Ray Dashboard GCS to become healthy at http://{self.host}:8265 ...")
                self.waited = True
            return self.code
        with dash.lock:
            if self.run is None:
                self.run = dash.runs.get(self.job_id) or self._submit()
                if self.run is None:
                    return self.code
            for line in self.run.lines[self.shown:]:
                self.log(line)
            self.shown = len(self.run.lines)
            if self.run.status in TERMINAL_JOB:
                verdict = {"SUCCEEDED": "succeeded", "FAILED": "failed", "STOPPED": "was stopped"}[self.run.status]
                self.log(f"Job '{self.job_id}' {verdict}")
                if self.run.status == "FAILED":
                    self.log(f"Status message: {self.run.message}")
                self.code = 0
        return self.code

    def _submit(self) -> RayJobRun | None:
        dash, ns = self.sim.dashboards, self.pod["metadata"]["namespace"]
        rayjob = self.sim.store.get("rayjobs", ns, self.rayjob)
        uid = rayjob["metadata"]["uid"]
        if self.job_id not in dash.planned:
            dash.attempts[uid] = dash.attempts.get(uid, 0) + 1
            dash.planned[self.job_id] = dash.attempt(rayjob, dash.attempts[uid])
        attempt = dash.planned[self.job_id]
        if attempt.submission_fails:
            self.log(f"Error: failed to submit job {self.job_id}")
            self.code = 1
            return None
        run = RayJobRun(self.job_id, rayjob["status"].get("rayClusterName", ""), ns, self.pod["metadata"]["name"],
                        self.rayjob, attempt, dash.attempts[uid], host=self.host, status="RUNNING",
                        message="Job is currently running.", start_ms=_ms())
        dash.runs[self.job_id] = run
        attempt.start(rayjob["spec"].get("entrypoint", ""), {}, run.lines.append)
        return run


@dataclass
class Image:
    """What every container started from an image does instead of its command: print, then exit."""

    exit_code: int = 1
    output: tuple[str, ...] = ()


@dataclass
class Handle:
    kind: str
    host: str = ""
    code: int | None = None
    step: Callable[[], int | None] | None = None
    proc: subprocess.Popen | None = None


class SimulatedRuntime:
    """The container runtime of a cluster whose pods are not hosts; see the module docstring."""

    def __init__(self, sim, images: dict[str, Image] | None = None, missing: set[str] | None = None):
        self.sim, self.images, self.missing = sim, images or {}, missing or set()
        self.ips: dict[str, str] = {}

    def sandbox(self, pod: dict) -> str:
        uid = pod["metadata"]["uid"]
        self.ips.setdefault(uid, f"10.244.{len(self.ips) // 250}.{len(self.ips) % 250 + 2}")
        return self.ips[uid]

    def release(self, uid: str) -> None:
        self.ips.pop(uid, None)

    def pull(self, image: str) -> str | None:
        if image in self.missing:
            return (f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": failed to resolve '
                    f'reference "{image}": {image}: not found')
        return None

    def start(self, pod, container, env, log):
        image = self.images.get(container.get("image", ""))
        if image is not None:
            for line in image.output:
                log(line)
            return Handle("crash", code=image.exit_code)
        text = " ".join([*container.get("command", []), *container.get("args", [])])
        cluster = pod["metadata"].get("labels", {}).get("ray.io/cluster", "")
        host = f"{cluster}-head-svc.{pod['metadata']['namespace']}.svc.cluster.local"
        if "ray start --head" in text:
            self.sim.dashboards.heads.add(host)
            return Handle("head", host)
        if "ray health-check" in text:
            return Handle("wait-gcs", step=lambda: 0 if host in self.sim.dashboards.heads else None)
        if "ray start" in text:
            return Handle("worker")
        if "ray job submit" in text:
            return Handle("submitter", step=Submitter(self.sim, pod, env, log).step)
        base = {k: os.environ[k] for k in ("PATH", "HOME", "PYTHONPATH") if k in os.environ}
        base["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), base.get("PATH", "")])
        proc = subprocess.Popen([*container.get("command", []), *container.get("args", [])], env={**base, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=lambda: [log(line.rstrip("\n")) for line in proc.stdout], daemon=True).start()
        return Handle("process", proc=proc)

    def exited(self, handle: Handle) -> int | None:
        if handle.proc is not None:
            return handle.proc.poll()
        if handle.step is not None and handle.code is None:
            handle.code = handle.step()
        return handle.code

    def kill(self, handle: Handle) -> None:
        if handle.kind == "head":
            self.sim.dashboards.down(handle.host)
        if handle.proc is not None and handle.proc.poll() is None:
            handle.proc.kill()
            handle.proc.wait()
        handle.code = 137 if handle.code is None else handle.code

    def probe(self, pod, container, handle: Handle) -> bool:
        return handle.code is None
