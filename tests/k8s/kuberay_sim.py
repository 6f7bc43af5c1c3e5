"""KubeRay's RayJob controller, simulated against the API server of :mod:`tests.k8s.apiserver`, with the cluster
below it: KubeRay's RayCluster controller (:mod:`tests.k8s.raycluster_sim`), the scheduler
(:mod:`tests.k8s.scheduler_sim`), the kubelets and the Job controller (:mod:`tests.k8s.kubelet_sim`) and a
container runtime: simulated containers and dashboards (:mod:`tests.k8s.runtime_sim`), or pods that are real
hosts in network namespaces running Ray (:mod:`tests.k8s.hosts`).

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
  and annotations from the RayJob, controller owner), wait for the RayCluster's ``state: ready`` (copying its
  status into ``rayClusterStatus``), the dashboard URL from the head Service's port named ``dashboard``
  (``utils.FetchHeadServiceURL``), ``createK8sJobIfNeed`` (a batch Job named like the RayJob, its container
  from ``GetSubmitterTemplate``/``configureSubmitterContainer``: ``/bin/bash -ce --`` and
  ``common/job.go`` ``BuildJobSubmitCommand`` joined with single spaces, plus ``PYTHONUNBUFFERED``,
  ``RAY_DASHBOARD_ADDRESS``, ``RAY_JOB_SUBMISSION_ID``), Running. Running: suspend, active deadline,
  ``checkTransitionGracePeriodAndUpdateStatusIfNeeded`` (300 s),
  ``checkJobStatusCheckTimeoutAndUpdateStatusIfNeeded`` (``RAYJOB_STATUS_CHECK_TIMEOUT_SECONDS``, 300 s: Failed
  with ``JobStatusCheckTimeoutExceeded``, never retried), ``reconcileServices``,
  ``checkSubmitterAndUpdateStatusIfNeeded`` (a ``Failed`` submitter Job: AppFailed if the Ray job failed,
  else SubmissionFailed), ``checkSubmitterFinishedTimeoutAndUpdateStatusIfNeeded`` (30 s), the dashboard's
  job info (a failed check records ``jobStatusCheckFailureStartTime``, a good one clears it), terminal only
  when the Ray job is terminal *and* the submitter finished. Retrying/Suspending: ``deleteClusterResources``
  and ``deleteSubmitterJob`` until both are gone, then the reset to New (or Suspended). Complete/Failed:
  ``handleDeletionRules`` (the most impactful overdue rule per reconcile, ``isDeletionActionCompleted``,
  ``suspendWorkerGroups``), ``handleLegacyDeletionPolicy``, ``handleShutdownAfterJobFinishes``.
* ``checkBackoffLimitAndUpdateStatusIfNeeded``: ``failed``/``succeeded`` counted; a Failed attempt within
  ``backoffLimit`` becomes Retrying unless its reason is DeadlineExceeded or JobStatusCheckTimeoutExceeded.
* the garbage collector of kube-controller-manager runs each tick too (:meth:`Store.collect_garbage`).
* ``ray-operator/controllers/ray/utils/validation.go`` (:mod:`tests.k8s.kuberay_rules`). The
  ``RayJobDeletionPolicy`` feature gate is on, as in v1.7.0 (``pkg/features/features.go``).

Nothing runs ``RAY_ADDRESS=local``: a Ray job is what the submitter pod submits to its cluster's dashboard.
"""

from __future__ import annotations

import copy
import datetime
import random
import threading
from typing import Callable

from tests.k8s.apiserver import ApiError, Store, now, parse_time, rfc3339
from tests.k8s.kubelet_sim import Kubelet, job_controller
from tests.k8s.kuberay_rules import validate_rayjob
from tests.k8s.raycluster_sim import DASHBOARD_PORT, RayClusterController, fqdn
from tests.k8s.runtime_sim import (TERMINAL_JOB, Attempt, Dashboards, Image, RayJobRun, Scripted,
                                   SimulatedRuntime, Unreachable)
from tests.k8s.scheduler_sim import node, schedule

__all__ = ["FINALIZER", "RAND", "KubeRaySimulator", "RayJobRun", "Scripted", "Image", "go_time", "default_nodes"]

FINALIZER = "ray.io/rayjob-finalizer"  # utils/constant.go RayJobStopJobFinalizer
GRACE_S = 300  # RAYJOB_DEPLOYMENT_STATUS_TRANSITION_GRACE_PERIOD_SECONDS default
STATUS_CHECK_TIMEOUT_S = 300  # utils/constant.go DEFAULT_RAYJOB_STATUS_CHECK_TIMEOUT_SECONDS
SUBMITTER_FINISHED_TIMEOUT_S = 30  # rayjob_controller.go DefaultSubmitterFinishedTimeout
RAND = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand
IMPACT = {"DeleteSelf": 4, "DeleteCluster": 3, "DeleteWorkers": 2, "DeleteNone": 1}
HEALTH = 'python -c "import urllib.request; r=urllib.request.urlopen(\'%s\', timeout=%d); exit(0 if b\'success\' in ' \
         'r.read() else 1)"'  # utils/constant.go BasePythonHealthCommand


def rand5() -> str:
    return "".join(random.choice(RAND) for _ in range(5))


def default_nodes() -> list[dict]:
    """Three CPU nodes of 16 cores and 64 GiB: room for our default RayJob, not for a GPU."""
    return [node(f"node-{i}") for i in (1, 2, 3)]


def go_time(stamp: str) -> str:
    """A stored RFC3339 time as Go's ``%v`` prints a ``*metav1.Time`` (``time.Time.String``), as KubeRay's
    deadline messages show it."""
    return parse_time(stamp).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def _clean(status: dict) -> dict:
    """Go's ``omitempty``: empty strings and empty objects are not written (counters are pointers: kept)."""
    return {k: v for k, v in status.items() if v not in ("", None, {})}


def submit_command(job: dict) -> str:
    """``BuildJobSubmitCommand`` (K8sJobMode) joined with single spaces, as the submitter's bash runs it."""
    address = "http://" + job["status"]["dashboardURL"]
    job_id, entrypoint = job["status"]["jobId"], job["spec"].get("entrypoint", "").strip()
    wait = ["until", HEALTH % (f"{address}/api/gcs_healthz", 10), ">/dev/null", "2>&1", ";", "do", "echo",
            f'"Waiting for Ray Dashboard GCS to become healthy at {address} ..."', ";", "sleep", "2", ";", "done", ";"]
    cmd = [*wait, "if", "!", "ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1", ";", "then",
           "ray", "job", "submit", "--address", address, "--no-wait", "--submission-id", job_id, "--", entrypoint, ";",
           "fi", ";", "ray", "job", "logs", "--address", address, "--follow", job_id]
    return " ".join(cmd)


class KubeRaySimulator:
    """Reconciles every RayJob of ``store`` each ``tick_s`` in a thread (KubeRay requeues every 3 s; sooner is
    the same machine, faster), with the cluster below it.

    Args:
        attempt: ``(rayjob, number) -> Attempt``, the work of each Ray job a simulated submitter submits
            (default: one that succeeds).
        kill_when: asked each tick while a simulated Ray job runs; true kills its driver.
        nodes: the cluster's Node objects (default :func:`default_nodes`), created unless the store has nodes.
        runtime: the container runtime (default: :class:`SimulatedRuntime` with ``images``/``missing_images``);
            pods as hosts pass :class:`tests.k8s.hosts.HostRuntime`, whose ``dashboards`` answer for real.
        status_check_timeout_s: the operator's ``RAYJOB_STATUS_CHECK_TIMEOUT_SECONDS``.
        backoff_scale: the kubelet's restart back-off, as a fraction of the real one.
    """

    def __init__(self, store: Store, attempt: Callable[[dict, int], Attempt] | None = None,
                 kill_when: Callable[[RayJobRun], bool] | None = None, deletion_policy_gate: bool = True,
                 tick_s: float = 0.05, nodes: list[dict] | None = None, runtime=None,
                 images: dict[str, Image] | None = None, missing_images: set[str] | None = None,
                 status_check_timeout_s: float = STATUS_CHECK_TIMEOUT_S, backoff_scale: float = 0.01):
        self.store, self.gate, self.tick_s = store, deletion_policy_gate, tick_s
        self.status_check_timeout_s = status_check_timeout_s
        self.dashboards = Dashboards(attempt or (lambda rayjob, number: Scripted()), kill_when)
        self.runtime = runtime or SimulatedRuntime(self, images, missing_images)
        if runtime is not None and hasattr(runtime, "dashboards"):
            self.dashboards = runtime.dashboards
        if not store.list("nodes", ""):
            for obj in nodes if nodes is not None else default_nodes():
                store.apply(obj)
        self.kubelet = Kubelet(store, self.runtime, backoff_scale)
        self.rayclusters = RayClusterController(store)
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

    @property
    def runs(self) -> dict[str, RayJobRun]:
        return self.dashboards.runs

    @property
    def attempt(self) -> Callable[[dict, int], Attempt]:
        return self.dashboards.attempt

    @attempt.setter
    def attempt(self, factory: Callable[[dict, int], Attempt]) -> None:
        self.dashboards.attempt = factory

    def __enter__(self) -> KubeRaySimulator:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)
        self.shutdown()

    def shutdown(self) -> None:
        """Every container stopped, every Ray job killed."""
        for uid in list(self.kubelet.pods):
            self.kubelet._stop(uid)
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
        """One round: the RayCluster controller, the Job controller, the scheduler, the kubelets and the
        dashboards move on, then every RayJob is reconciled once. Tests of the controller's own rules call it
        directly (no thread: each step is deterministic)."""
        with self._lock:
            self.store.collect_garbage()
            self.dashboards.tick()
            self.rayclusters.tick()
            job_controller(self.store)
            schedule(self.store)
            self.kubelet.tick()
            job_controller(self.store)
            for rayjob in self.store.list("rayjobs", None):
                self.reconcile(rayjob["metadata"]["namespace"], rayjob["metadata"]["name"])

    def stop_job(self, job_id: str) -> None:
        """Dashboard ``POST /api/jobs/<id>/stop`` (``ray job stop``; ``job_manager.py`` ``stop_job``)."""
        with self._lock:
            self.dashboards.stop(job_id)

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
                try:  # StopJob's errors are only logged
                    self.dashboards.stop(status.get("jobId", ""), status.get("dashboardURL", "").rsplit(":", 1)[0])
                except (Unreachable, OSError):
                    pass
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
            url = self._dashboard_url(cluster)
            if url is None:
                return False  # "dashboard port is not found" (or no Service yet): requeue
            status["dashboardURL"] = url
        if job["spec"].get("submissionMode", "K8sJobMode") != "K8sJobMode":
            raise NotImplementedError("the simulator runs K8sJobMode only (ours)")
        self._create_submitter(job)
        status["jobDeploymentStatus"] = "Running"
        return True

    def _dashboard_url(self, cluster: dict) -> str | None:
        """``utils.FetchHeadServiceURL``: ``<service>.<ns>.svc.cluster.local:<port named dashboard>``."""
        ns, name = cluster["metadata"]["namespace"], cluster["metadata"]["name"]
        try:
            service = self.store.get("services", ns, f"{name}-head-svc")
        except ApiError:
            return None
        port = next((p["port"] for p in service["spec"]["ports"] if p.get("name") == "dashboard"), None)
        return f"{fqdn(name, ns)}:{port}" if port is not None else None

    def _create_submitter(self, job: dict) -> None:
        """``createK8sJobIfNeed``: the submitter Job (the Job controller makes its pod)."""
        ns, name, status = job["metadata"]["namespace"], job["metadata"]["name"], job["status"]
        try:
            self.store.get("jobs", ns, name)
            return
        except ApiError:
            pass
        spec = job["spec"]
        template = copy.deepcopy(spec.get("submitterPodTemplate") or {"spec": {"containers": [{
            "name": "ray-job-submitter", "image": spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
            ["containers"][0].get("image"), "resources": {"limits": {"cpu": "1", "memory": "1Gi"},
                                                         "requests": {"cpu": "500m", "memory": "200Mi"}}}],
            "restartPolicy": "Never"}})
        container = template["spec"]["containers"][0]
        if not container.get("command"):
            container.update(command=["/bin/bash", "-ce", "--"], args=[submit_command(job)])
        container["env"] = [*container.get("env", []), {"name": "PYTHONUNBUFFERED", "value": "1"},
                            {"name": "RAY_DASHBOARD_ADDRESS", "value": status["dashboardURL"]},
                            {"name": "RAY_JOB_SUBMISSION_ID", "value": status["jobId"]}]
        origin = {"ray.io/originated-from-cr-name": name, "ray.io/originated-from-crd": "RayJob",
                  "app.kubernetes.io/created-by": "kuberay-operator"}
        template.setdefault("metadata", {}).setdefault("labels", {}).update(origin)
        backoff = (spec.get("submitterConfig") or {}).get("backoffLimit", 2)
        self.store.create("jobs", ns, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {
            "name": name, "labels": origin, "ownerReferences": [self._owner(job)]},
            "spec": {"backoffLimit": backoff, "template": template}})

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
        failing_since = status.get("jobStatusCheckFailureStartTime")
        if failing_since and now() >= parse_time(failing_since) + datetime.timedelta(
                seconds=self.status_check_timeout_s):
            status.update(jobDeploymentStatus="Failed", reason="JobStatusCheckTimeoutExceeded",
                          message=f"Job status checks have been failing since "
                                  f"{parse_time(failing_since):%Y-%m-%d %H:%M:%S}; exceeded timeout of "
                                  f"{int(self.status_check_timeout_s)}s")
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
        try:
            info = self.dashboards.info(status["dashboardURL"].rsplit(":", 1)[0], status.get("jobId", ""))
        except Unreachable:  # recordJobStatusCheckFailure
            status.setdefault("jobStatusCheckFailureStartTime", rfc3339())
            return True
        status.pop("jobStatusCheckFailureStartTime", None)
        if info is None:
            if finished_at is not None:
                status.update(jobDeploymentStatus="Failed", reason="AppFailed",
                              message="Submitter completed but Ray job not found in RayCluster.")
            return True
        terminal = info["status"] in TERMINAL_JOB and finished_at is not None
        deployment, reason = "Running", ""
        if terminal:
            deployment, reason = ("Failed", "AppFailed") if info["status"] == "FAILED" else ("Complete", "")
        status.update(rayClusterStatus=cluster.get("status", {}), jobStatus=info["status"],
                      jobDeploymentStatus=deployment, reason=reason, message=info["message"])
        times = {k: rfc3339(info[k]) for k in ("startTime", "endTime") if info.get(k)}
        status["rayJobInfo"] = {**status.get("rayJobInfo", {}), **times}
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
                "ports": [{"name": "dashboard", "port": DASHBOARD_PORT}]}})

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
