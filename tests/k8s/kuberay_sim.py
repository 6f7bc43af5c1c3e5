"""KubeRay's RayJob controller, simulated against the API server of :mod:`tests.k8s.apiserver`.

Built from KubeRay **v1.7.0** (``ray-project/kuberay`` tag ``v1.7.0``, the version of the CRDs in
../shared/schemas/kuberay), ``ray-operator/controllers/ray/rayjob_controller.go``:

* ``Reconcile``, in its order: NotFound stops; ``managedBy`` another controller skips; a ``deletionTimestamp``
  stops the Ray job unless its status is terminal and removes the finalizer ``ray.io/rayjob-finalizer``;
  ``validateRayJob`` on every reconcile, writing ``ValidationFailed`` (reason and message the error); the
  switch on ``jobDeploymentStatus``; then ``checkBackoffLimitAndUpdateStatusIfNeeded`` and
  ``updateRayJobStatus``, which writes only when ``jobStatus``, ``jobDeploymentStatus``, the cluster's status
  or ``jobStatusCheckFailureStartTime`` changed and sets ``endTime`` on Complete/Failed.
* New: the finalizer, ``initRayJobStatusIfNeed`` (``jobId`` and ``rayClusterName`` ``<rayjob>-<5 chars>``,
  Initializing, ``startTime`` = now, so deadlines count per attempt). Initializing:
  ``updateStatusToSuspendingIfNeeded``, ``checkActiveDeadlineAndUpdateStatusIfNeeded``,
  ``checkPreRunningDeadlineAndUpdateStatusIfNeeded``, ``getOrCreateRayClusterInstance`` (spec copied, labels
  and annotations from the RayJob, controller owner), wait for ``state: ready``, the dashboard URL,
  ``createK8sJobIfNeed`` (a batch Job named like the RayJob), Running. Running: suspend, active deadline,
  ``checkTransitionGracePeriodAndUpdateStatusIfNeeded`` (300 s), ``reconcileServices``,
  ``checkSubmitterAndUpdateStatusIfNeeded`` (a ``Failed`` submitter Job: AppFailed if the Ray job failed,
  else SubmissionFailed), ``checkSubmitterFinishedTimeoutAndUpdateStatusIfNeeded`` (30 s), the dashboard's
  job info, terminal only when the Ray job is terminal *and* the submitter finished. Retrying/Suspending:
  ``deleteClusterResources`` and ``deleteSubmitterJob`` until both are gone, then the reset to New (or
  Suspended). Complete/Failed: ``handleDeletionRules`` (the most impactful overdue rule per reconcile,
  ``isDeletionActionCompleted``, ``suspendWorkerGroups``), ``handleLegacyDeletionPolicy``,
  ``handleShutdownAfterJobFinishes``.
* ``checkBackoffLimitAndUpdateStatusIfNeeded``: ``failed``/``succeeded`` counted; a Failed attempt within
  ``backoffLimit`` becomes Retrying unless its reason is DeadlineExceeded.
* ``ray-operator/controllers/ray/utils/validation.go``: ``ValidateRayJobMetadata`` (47 characters, DNS-1035),
  ``ValidateRayJobSpec`` in its order with ``validateDeletionConfiguration``, ``validateDeletionRules``
  (errors joined with newlines), ``validateTTLConsistency``, ``validateLegacyDeletionPolicies``, the parts of
  ``ValidateRayClusterSpec`` a RayJob of ours can reach, and ``ValidateRayJobStatus``. The
  ``RayJobDeletionPolicy`` feature gate is on, as in v1.7.0 (``pkg/features/features.go``).

What stands in for what KubeRay talks to: a RayCluster becomes ``ready`` ``cluster_ready_after_s`` after its
creation (None: never), with no pods; the submitter Job's pod appears at once (label ``job-name``), and its log
is the Ray job's output followed by ``ray job logs --follow``'s last words (``ray/dashboard/modules/job/cli.py``
``_log_job_status``); the Job then completes, also when the Ray job failed. The Ray job of an attempt (the
dashboard, ``ray/dashboard/modules/job/job_supervisor.py``) is an :class:`Attempt`: by default the RayJob's
entrypoint as a process (words as the submitter's bash makes them, run through a shell with the head container's
literal ``env`` over this process's environment; Secrets and ConfigMaps are not simulated, the test's
environment stands in for them). No Ray processes run for the cluster: ``RAY_ADDRESS=local`` makes the
driver's ``ray.init(address="auto")`` start a private Ray (``RAY_ADDRESS`` wins over the argument,
``ray/_private/services.py`` ``get_ray_address_from_environment``) where KubeRay's job supervisor would point it
at the cluster. The dashboard never fails, so ``JobStatusCheckTimeoutExceeded`` does not occur.
"""

from __future__ import annotations

import copy
import datetime
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol

from tests.k8s.apiserver import ApiError, Store, now, parse_time, rfc3339
from tests.k8s.kuberay_rules import validate_rayjob

FINALIZER = "ray.io/rayjob-finalizer"  # utils/constant.go RayJobStopJobFinalizer
GRACE_S = 300  # RAYJOB_DEPLOYMENT_STATUS_TRANSITION_GRACE_PERIOD_SECONDS default
SUBMITTER_FINISHED_TIMEOUT_S = 30  # rayjob_controller.go DefaultSubmitterFinishedTimeout
RAND = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand
TERMINAL_JOB = ("STOPPED", "SUCCEEDED", "FAILED")  # rayjob_types.go IsJobTerminal
IMPACT = {"DeleteSelf": 4, "DeleteCluster": 3, "DeleteWorkers": 2, "DeleteNone": 1}


def rand5() -> str:
    return "".join(random.choice(RAND) for _ in range(5))


class Attempt(Protocol):
    """The Ray job of one attempt, as the dashboard sees it."""

    submission_fails: bool

    def start(self, command: str, env: dict[str, str], emit: Callable[[str], None]) -> None: ...

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...


class EntrypointProcess:
    """The entrypoint run as a process group (the driver and its local Ray), its output line by line."""

    submission_fails = False

    def __init__(self, workdir: str):
        self.workdir, self.proc, self.reader = workdir, None, None

    def start(self, command, env, emit):
        self.proc = subprocess.Popen(command, shell=True, env=env, cwd=self.workdir, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.reader = threading.Thread(target=lambda: [emit(line.rstrip("\n")) for line in self.proc.stdout],
                                       daemon=True)
        self.reader.start()

    def poll(self):
        if self.proc is None or self.proc.poll() is None:
            return None
        self.reader.join(timeout=10)
        return self.proc.returncode

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


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
    status: str = "PENDING"
    message: str = "Job has not started yet."
    start_ms: int = 0
    end_ms: int = 0
    lines: list[str] = field(default_factory=list)
    reported: bool = False  # the submitter has printed its last lines and exited


def _ms() -> int:
    return int(now().timestamp() * 1000)


def go_time(stamp: str) -> str:
    """A stored RFC3339 time as Go's ``%v`` prints a ``*metav1.Time`` (``time.Time.String``), as KubeRay's
    deadline messages show it."""
    return parse_time(stamp).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def _clean(status: dict) -> dict:
    """Go's ``omitempty``: empty strings and empty objects are not written (counters are pointers: kept)."""
    return {k: v for k, v in status.items() if v not in ("", None, {})}


class KubeRaySimulator:
    """Reconciles every RayJob of ``store`` each ``tick_s`` in a thread (KubeRay requeues every 3 s; sooner is
    the same machine, faster). ``attempt(rayjob, number)`` makes each attempt's Ray job; ``kill_when(run)``,
    asked each tick while a Ray job runs, kills its driver (SIGKILL) when true."""

    def __init__(self, store: Store, attempt: Callable[[dict, int], Attempt] | None = None,
                 kill_when: Callable[[RayJobRun], bool] | None = None, cluster_ready_after_s: float | None = 0.0,
                 deletion_policy_gate: bool = True, tick_s: float = 0.05):
        self.store, self.kill_when, self.gate = store, kill_when, deletion_policy_gate
        self.ready_after, self.tick_s = cluster_ready_after_s, tick_s
        self.workdir = tempfile.mkdtemp(prefix="kuberay-sim-")
        self.attempt = attempt or (lambda rayjob, number: EntrypointProcess(self.workdir))
        self.runs: dict[str, RayJobRun] = {}
        self.attempts: dict[str, int] = {}  # RayJob uid -> attempts started
        self.history: dict[str, list[str]] = {}  # RayJob name -> every jobDeploymentStatus written
        self.statuses: dict[str, list[dict]] = {}  # RayJob name -> every status written, whole
        # called (in the operator's thread) after each status write: a test can hold the operator there until
        # a watcher has read that status, so a short-lived state cannot pass unseen
        self.after_write: Callable[[str, dict], None] | None = None
        self.stopping = threading.Event()
        self.paused = threading.Event()  # set: the operator is down
        self._idle = threading.Event()  # the loop has seen `paused`
        self.errors: list[str] = []
        self._lock = threading.RLock()  # one tick at a time; a test's stop_job waits for it
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> KubeRaySimulator:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)
        for run in self.runs.values():
            run.attempt.kill()

    def pause(self) -> None:
        """Take the operator down; returns once no reconcile is under way."""
        self._idle.clear()
        self.paused.set()
        assert self._idle.wait(timeout=60), "the simulator's loop did not pause"

    def _loop(self) -> None:
        while not self.stopping.wait(self.tick_s):
            if self.paused.is_set():
                self._idle.set()
                continue
            try:
                self.tick()
            except Exception as exc:  # a bug here must fail the test, not hang it
                self.errors.append(repr(exc))
                raise

    def tick(self) -> None:
        """One round: the cluster, submitter and dashboard move on, then every RayJob is reconciled once. Tests
        of the controller's own rules call it directly (no thread: each step is deterministic)."""
        with self._lock:
            self._clusters_and_runs()
            for rayjob in self._all("rayjobs"):
                self.reconcile(rayjob["metadata"]["namespace"], rayjob["metadata"]["name"])

    def _all(self, resource: str) -> list[dict]:
        with self.store.lock:
            return [copy.deepcopy(o) for (r, _, _), o in self.store.objects.items() if r == resource]

    # ---- what KubeRay talks to: the cluster, the submitter, the dashboard ----------------------------------

    def _clusters_and_runs(self) -> None:
        for cluster in self._all("rayclusters"):  # the RayCluster controller, as far as readiness goes
            age = (now() - parse_time(cluster["metadata"]["creationTimestamp"])).total_seconds()
            ready = cluster.get("status", {}).get("state") == "ready"
            if self.ready_after is not None and age >= self.ready_after and not ready:
                cluster["status"] = {"state": "ready", "readyWorkerReplicas": sum(
                    g.get("replicas", 0) for g in cluster["spec"].get("workerGroupSpecs", []))}
                self._write(lambda c=cluster: self.store.update("rayclusters", c["metadata"]["namespace"], c, True))
        clusters = {(c["metadata"]["namespace"], c["metadata"]["name"]) for c in self._all("rayclusters")}
        for run in list(self.runs.values()):
            if (run.namespace, run.cluster) not in clusters and run.status in ("PENDING", "RUNNING"):
                run.attempt.kill()  # the cluster's pods are gone
                run.status, run.message, run.end_ms = "FAILED", "Job failed: the cluster is gone.", _ms()
            elif run.status == "PENDING":
                env, command = self._process(run)
                run.status, run.message, run.start_ms = "RUNNING", "Job is currently running.", _ms()
                run.attempt.start(command, env, lambda line, r=run: self._emit(r, line))
            elif run.status == "RUNNING":
                if self.kill_when is not None and self.kill_when(run):
                    run.attempt.kill()
                code = run.attempt.poll()
                if code is not None:
                    self._finish(run, code)
            if run.status in TERMINAL_JOB and not run.reported:
                self._submitter_exits(run)

    def _emit(self, run: RayJobRun, line: str) -> None:
        run.lines.append(line)
        self.store.log(run.namespace, run.pod, line)

    def _finish(self, run: RayJobRun, code: int) -> None:
        run.end_ms = _ms()
        if code == 0:
            run.status, run.message = "SUCCEEDED", "Job finished successfully."
        else:
            tail = "\n".join(run.lines)[-20000:]
            run.status = "FAILED"
            run.message = (f"Job entrypoint command failed with exit code {code}, last available logs (truncated to "
                           f"20,000 chars):\n{tail}" if tail else
                           f"Job entrypoint command failed with exit code {code}. No logs available.")

    def _submitter_exits(self, run: RayJobRun) -> None:
        """``ray job logs --follow`` returns (exit 0 whatever the job's status) and the Job completes."""
        run.reported = True
        verdict = {"SUCCEEDED": "succeeded", "FAILED": "failed", "STOPPED": "was stopped"}[run.status]
        self._emit(run, f"Job '{run.job_id}' {verdict}")
        if run.status == "FAILED":
            self._emit(run, f"Status message: {run.message}")
        self._job_condition(run.namespace, run.rayjob, "Complete", "", "")

    def _job_condition(self, namespace: str, name: str, kind: str, reason: str, message: str) -> None:
        try:
            job = self.store.get("jobs", namespace, name)
        except ApiError:
            return
        condition = {"type": kind, "status": "True", "lastTransitionTime": rfc3339(), "reason": reason,
                     "message": message}
        job["status"] = {"conditions": [_clean(condition)], ("succeeded" if kind == "Complete" else "failed"): 1}
        self._write(lambda: self.store.update("jobs", namespace, job, True))
        for pod in self.store.list("pods", namespace, f"job-name={name}"):
            pod["status"] = {"phase": "Succeeded" if kind == "Complete" else "Failed"}
            self._write(lambda p=pod: self.store.update("pods", namespace, p, True))

    def _process(self, run: RayJobRun) -> tuple[dict[str, str], str]:
        """The driver's environment and shell command, as the submitter's bash and the job supervisor make them."""
        rayjob = self.store.get("rayjobs", run.namespace, run.rayjob)
        spec = rayjob["spec"]
        submitter = (spec.get("submitterPodTemplate") or {}).get("spec", {}).get("containers", [{}])[0]
        submitter_env = {e["name"]: e["value"] for e in submitter.get("env", []) if "value" in e}
        submitter_env.update(PYTHONUNBUFFERED="1", RAY_JOB_SUBMISSION_ID=run.job_id,
                             PATH=os.environ.get("PATH", "/usr/bin:/bin"), HOME=os.environ.get("HOME", "/tmp"))
        words = subprocess.run(["bash", "-c", f"set -- {spec.get('entrypoint', '')}; printf '%s\\0' \"$@\""],
                               env=submitter_env, capture_output=True, text=True, timeout=30).stdout.split("\0")[:-1]
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        env = {**os.environ, **{e["name"]: e["value"] for e in head.get("env", []) if "value" in e}}
        env.update(RAY_ADDRESS="local", PYTHONUNBUFFERED="1",
                   PATH=os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")]))
        return env, shlex.join(words)

    def stop_job(self, job_id: str) -> None:
        """Dashboard ``POST /api/jobs/<id>/stop`` (``ray job stop``; ``job_manager.py`` ``stop_job``)."""
        with self._lock:
            run = self.runs.get(job_id)
            if run is not None and run.status in ("PENDING", "RUNNING"):
                run.attempt.kill()
                run.status, run.message, run.end_ms = "STOPPED", "Job was intentionally stopped.", _ms()

    # ---- the controller ------------------------------------------------------------------------------------

    def _write(self, action: Callable[[], dict]) -> dict | None:
        """A write the controller makes; a conflict or a vanished object means: next reconcile."""
        try:
            return action()
        except ApiError as exc:
            if exc.code in (404, 409):
                return None
            raise

    def reconcile(self, namespace: str, name: str) -> None:
        try:
            job = self.store.get("rayjobs", namespace, name)
        except ApiError:
            return
        spec, meta = job["spec"], job["metadata"]
        if spec.get("managedBy") not in (None, "ray.io/kuberay-operator"):
            return
        status = job.setdefault("status", {})
        if meta.get("deletionTimestamp"):
            if status.get("jobStatus", "") not in TERMINAL_JOB:
                self.stop_job(status.get("jobId", ""))
            meta["finalizers"] = [f for f in meta.get("finalizers", []) if f != FINALIZER]
            self._write(lambda: self.store.update("rayjobs", namespace, job))
            return
        original = copy.deepcopy(job)
        error = validate_rayjob(job, self.gate)
        if error:
            status.update(jobDeploymentStatus="ValidationFailed", reason="ValidationFailed", message=error)
            self._update_status(original, job)
            return
        state = status.get("jobDeploymentStatus", "")
        if state == "":
            if FINALIZER not in meta.get("finalizers", []):
                meta["finalizers"] = [*meta.get("finalizers", []), FINALIZER]
                updated = self._write(lambda: self.store.update("rayjobs", namespace, job))
                if updated is None:
                    return
                meta["resourceVersion"] = updated["metadata"]["resourceVersion"]
                original["metadata"] = copy.deepcopy(meta)
            self._init_status(job)
        elif state == "Initializing":
            if not self._initializing(job):
                return
        elif state == "Running":
            if not self._running(job):
                return
        elif state in ("Suspending", "Retrying"):
            if not self._tear_down(job):
                return
        elif state == "Suspended":
            if spec.get("suspend"):
                return
            status.update(jobStatus="", jobDeploymentStatus="")
        elif state in ("Complete", "Failed"):
            self._finished(job)
            return
        else:
            return  # "Unknown JobDeploymentStatus" (ValidationFailed included): requeue, nothing changes
        self._check_backoff_limit(job)
        self._update_status(original, job)

    def _update_status(self, original: dict, job: dict) -> None:
        old, new = original.get("status", {}), job["status"]
        keys = ("jobStatus", "jobDeploymentStatus", "rayClusterStatus", "jobStatusCheckFailureStartTime")
        if all((old.get(k) or "") == (new.get(k) or "") for k in keys):  # absent, "" and {} are all Go's zero
            return
        if new.get("jobDeploymentStatus") in ("Complete", "Failed"):
            new["endTime"] = rfc3339()
        job["status"] = _clean(new)
        if self._write(lambda: self.store.update("rayjobs", job["metadata"]["namespace"], job, True)) is not None:
            self.history.setdefault(job["metadata"]["name"], []).append(new.get("jobDeploymentStatus") or "New")
            self.statuses.setdefault(job["metadata"]["name"], []).append(copy.deepcopy(job["status"]))
            if self.after_write is not None:
                self.after_write(job["metadata"]["name"], copy.deepcopy(job["status"]))

    def _init_status(self, job: dict) -> None:
        status, name = job["status"], job["metadata"]["name"]
        if status.get("jobId") and status.get("rayClusterName") and status.get("jobStatus"):
            return
        status["jobId"] = status.get("jobId") or job["spec"].get("jobId") or f"{name}-{rand5()}"
        status["rayClusterName"] = status.get("rayClusterName") or f"{name}-{rand5()}"
        status.update(jobDeploymentStatus="Initializing", startTime=rfc3339())

    def _deadline(self, job: dict) -> bool:
        """``checkActiveDeadlineAndUpdateStatusIfNeeded``."""
        return self._passed(job, "activeDeadlineSeconds", "DeadlineExceeded")

    def _pre_running_deadline(self, job: dict) -> bool:
        """``checkPreRunningDeadlineAndUpdateStatusIfNeeded``."""
        return self._passed(job, "preRunningDeadlineSeconds", "PreRunningDeadlineExceeded")

    @staticmethod
    def _passed(job: dict, key: str, reason: str) -> bool:
        """Both deadline checks: ``startTime`` + ``spec.<key>`` passed fails the attempt with ``reason``."""
        limit, status = job["spec"].get(key), job["status"]
        if limit is None or now() < parse_time(status["startTime"]) + datetime.timedelta(seconds=limit):
            return False
        status.update(jobDeploymentStatus="Failed", reason=reason, message=f"The RayJob has passed the {key}. "
                      f"StartTime: {go_time(status['startTime'])}. {key[0].upper()}{key[1:]}: {limit}")
        return True

    def _suspending(self, job: dict) -> bool:
        if job["spec"].get("suspend"):
            job["status"]["jobDeploymentStatus"] = "Suspending"
            return True
        return False

    def _cluster(self, job: dict) -> dict:
        """``getOrCreateRayClusterInstance``."""
        ns, status = job["metadata"]["namespace"], job["status"]
        try:
            return self.store.get("rayclusters", ns, status["rayClusterName"])
        except ApiError:
            pass
        labels = {**job["metadata"].get("labels", {}), "ray.io/originated-from-cr-name": job["metadata"]["name"],
                  "ray.io/originated-from-crd": "RayJob",
                  "ray.io/job-submission-mode": job["spec"].get("submissionMode", "K8sJobMode")}
        cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
                   "metadata": {"name": status["rayClusterName"], "labels": labels,
                                "annotations": job["metadata"].get("annotations", {}),
                                "ownerReferences": [self._owner(job)]},
                   "spec": copy.deepcopy(job["spec"]["rayClusterSpec"])}
        return self.store.create("rayclusters", ns, cluster)[0]

    @staticmethod
    def _owner(obj: dict) -> dict:
        return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
                "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}

    def _initializing(self, job: dict) -> bool:
        status = job["status"]
        if self._suspending(job) or self._deadline(job) or self._pre_running_deadline(job):
            return True
        cluster = self._cluster(job)
        if not status.get("dashboardURL"):
            if cluster.get("status", {}).get("state") != "ready":
                status["rayClusterStatus"] = cluster.get("status", {})
                return True
            status["dashboardURL"] = f"{cluster['metadata']['name']}-head-svc.{job['metadata']['namespace']}.svc." \
                                     f"cluster.local:8265"
        if job["spec"].get("submissionMode", "K8sJobMode") != "K8sJobMode":
            raise NotImplementedError("the simulator runs K8sJobMode only (ours)")
        self._create_submitter(job)
        status["jobDeploymentStatus"] = "Running"
        return True

    def _create_submitter(self, job: dict) -> None:
        """``createK8sJobIfNeed``; the Job controller's pod and the submitter's ``ray job submit``."""
        ns, name, status = job["metadata"]["namespace"], job["metadata"]["name"], job["status"]
        try:
            self.store.get("jobs", ns, name)
            return
        except ApiError:
            pass
        spec = job["spec"]
        template = copy.deepcopy(spec.get("submitterPodTemplate") or {"spec": {"containers": [
            {"name": "ray-job-submitter", "image": spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
             ["containers"][0].get("image")}], "restartPolicy": "Never"}})
        origin = {"ray.io/originated-from-cr-name": name, "ray.io/originated-from-crd": "RayJob",
                  "app.kubernetes.io/created-by": "kuberay-operator"}
        template.setdefault("metadata", {}).setdefault("labels", {}).update(origin)
        backoff = (spec.get("submitterConfig") or {}).get("backoffLimit", 2)
        created = self.store.create("jobs", ns, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {
            "name": name, "labels": origin, "ownerReferences": [self._owner(job)]},
            "spec": {"backoffLimit": backoff, "template": template}})[0]
        pod_labels = {**template["metadata"]["labels"], "job-name": name, "batch.kubernetes.io/job-name": name,
                      "controller-uid": created["metadata"]["uid"]}
        pod = self.store.create("pods", ns, {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"{name}-{rand5()}", "labels": pod_labels, "ownerReferences": [self._owner(created)]},
            "spec": template["spec"]})[0]
        uid = job["metadata"]["uid"]
        self.attempts[uid] = self.attempts.get(uid, 0) + 1
        attempt = self.attempt(job, self.attempts[uid])
        if attempt.submission_fails:
            self._emit(RayJobRun("", "", ns, pod["metadata"]["name"], name, attempt, 0),
                       f"Error: failed to submit job {status['jobId']}")
            self._job_condition(ns, name, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff "
                                "limit")
            return
        self.runs[status["jobId"]] = RayJobRun(status["jobId"], status["rayClusterName"], ns, pod["metadata"]["name"],
                                               name, attempt, self.attempts[uid])

    def _running(self, job: dict) -> bool:
        status, ns, name = job["status"], job["metadata"]["namespace"], job["metadata"]["name"]
        if self._suspending(job) or self._deadline(job):
            return True
        info_end = status.get("rayJobInfo", {}).get("endTime")
        if status.get("jobStatus", "") in TERMINAL_JOB and info_end and \
                now() >= parse_time(info_end) + datetime.timedelta(seconds=GRACE_S):
            status.update(jobDeploymentStatus="Failed" if status["jobStatus"] == "FAILED" else "Complete",
                          reason="JobDeploymentStatusTransitionGracePeriodExceeded", message="JobDeploymentStatus "
                          "does not transition to Complete or Failed within the grace period after JobStatus reaches "
                          "a terminal state.")
            return True
        cluster = self._cluster(job)
        self._service(job, cluster)
        try:
            submitter = self.store.get("jobs", ns, name)
        except ApiError:
            return False  # error: requeue
        conditions = submitter.get("status", {}).get("conditions", [])
        failed = next((c for c in conditions if c["type"] == "Failed" and c["status"] == "True"), None)
        finished = next((c for c in conditions if c["type"] in ("Complete", "Failed") and c["status"] == "True"), None)
        finished_at = parse_time(finished["lastTransitionTime"]) if finished else None
        if failed is not None:
            status["jobDeploymentStatus"] = "Failed"
            if status.get("jobStatus") == "FAILED":
                status["reason"] = "AppFailed"
            else:
                status.update(reason="SubmissionFailed", message=f"Job submission has failed. Reason: "
                              f"{failed.get('reason', '')}. Message: {failed.get('message', '')}")
        if finished_at is not None and now() >= finished_at + datetime.timedelta(seconds=SUBMITTER_FINISHED_TIMEOUT_S):
            status.update(jobStatus="FAILED", jobDeploymentStatus="Failed",
                          reason="JobDeploymentStatusTransitionGracePeriodExceeded", message=f"The RayJob submitter "
                          f"finished at {finished_at:%Y-%m-%d %H:%M:%S} but the ray job did not reach terminal state "
                          f"within {SUBMITTER_FINISHED_TIMEOUT_S}s")
            return True
        if failed is not None:
            return True
        run = self.runs.get(status.get("jobId", ""))
        if run is None:
            if finished_at is not None:
                status.update(jobDeploymentStatus="Failed", reason="AppFailed",
                              message="Submitter completed but Ray job not found in RayCluster.")
                return True
            return False
        terminal = run.status in TERMINAL_JOB and finished_at is not None
        deployment, reason = "Running", ""
        if terminal:
            deployment, reason = ("Failed", "AppFailed") if run.status == "FAILED" else ("Complete", "")
        status.update(rayClusterStatus=cluster.get("status", {}), jobStatus=run.status, jobDeploymentStatus=deployment,
                      reason=reason, message=run.message)
        info = {}
        if run.start_ms:
            info["startTime"] = rfc3339(datetime.datetime.fromtimestamp(run.start_ms / 1000, datetime.timezone.utc))
        if run.end_ms:
            info["endTime"] = rfc3339(datetime.datetime.fromtimestamp(run.end_ms / 1000, datetime.timezone.utc))
        status["rayJobInfo"] = {**status.get("rayJobInfo", {}), **info}
        return True

    def _service(self, job: dict, cluster: dict) -> None:
        """``reconcileServices``: the RayJob's head Service ``<rayjob>-head-svc``."""
        ns, name = job["metadata"]["namespace"], f"{job['metadata']['name']}-head-svc"
        try:
            self.store.get("services", ns, name)
        except ApiError:
            self.store.create("services", ns, {"apiVersion": "v1", "kind": "Service", "metadata": {
                "name": name, "ownerReferences": [self._owner(job)]}, "spec": {
                "selector": {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"},
                "ports": [{"name": "dashboard", "port": 8265}]}})

    def _delete(self, resource: str, ns: str, name: str) -> bool:
        """``deleteClusterResources`` / ``deleteSubmitterJob``: done only once a read finds it gone."""
        try:
            obj = self.store.get(resource, ns, name)
        except ApiError:
            return True
        if not obj["metadata"].get("deletionTimestamp"):
            self._write(lambda: self.store.delete(resource, ns, name))
        return False

    def _tear_down(self, job: dict) -> bool:
        ns, name, status = job["metadata"]["namespace"], job["metadata"]["name"], job["status"]
        cluster_gone = self._delete("rayclusters", ns, status.get("rayClusterName", ""))
        job_gone = self._delete("jobs", ns, name)
        if not (cluster_gone and job_gone):
            return False
        for key in ("rayClusterStatus", "rayClusterName", "dashboardURL", "jobId", "message", "reason", "rayJobInfo",
                    "jobStatusCheckFailureStartTime", "jobStatus"):
            status.pop(key, None)
        status["jobDeploymentStatus"] = {"Suspending": "Suspended", "Retrying": ""}[status["jobDeploymentStatus"]]
        return True

    def _check_backoff_limit(self, job: dict) -> None:
        """``checkBackoffLimitAndUpdateStatusIfNeeded``."""
        status, limit = job["status"], job["spec"].get("backoffLimit")
        failed = status.get("failed", 0) + (status.get("jobDeploymentStatus") == "Failed")
        succeeded = status.get("succeeded", 0) + (status.get("jobStatus") == "SUCCEEDED"
                                                  and status.get("jobDeploymentStatus") == "Complete")
        status.update(failed=failed, succeeded=succeeded)
        if status.get("jobDeploymentStatus") == "Failed" and limit is not None and failed < limit + 1:
            if status.get("reason") not in ("DeadlineExceeded", "JobStatusCheckTimeoutExceeded"):
                status["jobDeploymentStatus"] = "Retrying"

    def _finished(self, job: dict) -> None:
        """Complete/Failed: the deletion policies (``handleDeletionRules``, ``handleLegacyDeletionPolicy``,
        ``handleShutdownAfterJobFinishes``)."""
        spec, status, ns = job["spec"], job["status"], job["metadata"]["namespace"]
        if spec.get("clusterSelector"):
            return
        end = parse_time(status["endTime"]) if status.get("endTime") else now()
        strategy = spec.get("deletionStrategy")
        if self.gate and strategy is not None:
            if strategy.get("deletionRules") is not None:
                overdue = [r for r in strategy["deletionRules"] if self._matches(r, status)
                           and now() >= end + datetime.timedelta(seconds=r["condition"].get("ttlSeconds", 0))
                           and not self._done(job, r["policy"])]
                if overdue:
                    self._execute(job, max(overdue, key=lambda r: IMPACT[r["policy"]]))
                return
            policy = {"SUCCEEDED": strategy.get("onSuccess"), "FAILED": strategy.get("onFailure")}.get(
                status.get("jobStatus", ""))
            if policy and policy.get("policy") != "DeleteNone" and now() >= end + datetime.timedelta(
                    seconds=spec.get("ttlSecondsAfterFinished", 0)):
                self._execute(job, {"policy": policy["policy"]})
            return
        if spec.get("shutdownAfterJobFinishes") and now() >= end + datetime.timedelta(
                seconds=spec.get("ttlSecondsAfterFinished", 0)):
            self._delete("rayclusters", ns, status.get("rayClusterName", ""))

    @staticmethod
    def _matches(rule: dict, status: dict) -> bool:
        condition = rule["condition"]
        if "jobStatus" in condition:
            return condition["jobStatus"] == status.get("jobStatus", "")
        return condition["jobDeploymentStatus"] == status.get("jobDeploymentStatus", "")

    def _done(self, job: dict, policy: str) -> bool:
        """``isDeletionActionCompleted``."""
        try:
            cluster = self.store.get("rayclusters", job["metadata"]["namespace"], job["status"].get("rayClusterName", ""))
        except ApiError:
            return policy != "DeleteSelf"
        if policy == "DeleteNone" or cluster["metadata"].get("deletionTimestamp"):
            return policy != "DeleteSelf"
        if policy == "DeleteWorkers":
            return all(g.get("suspend") for g in cluster["spec"].get("workerGroupSpecs", []))
        return False

    def _execute(self, job: dict, rule: dict) -> None:
        """``executeDeletionPolicy``; DeleteWorkers is ``suspendWorkerGroups``."""
        ns, policy = job["metadata"]["namespace"], rule["policy"]
        cluster_name = job["status"].get("rayClusterName", "")
        if policy == "DeleteCluster":
            self._delete("rayclusters", ns, cluster_name)
        elif policy == "DeleteWorkers":
            cluster = self.store.get("rayclusters", ns, cluster_name)
            for group in cluster["spec"].get("workerGroupSpecs", []):
                group["suspend"] = True
            self._write(lambda: self.store.update("rayclusters", ns, cluster))
        elif policy == "DeleteSelf":
            self._write(lambda: self.store.delete("rayjobs", ns, job["metadata"]["name"]))
