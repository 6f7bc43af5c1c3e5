"""The simulated KubeRay v1.7.0 RayJob controller (tests/k8s/kuberay_sim.py), step by step: each test drives
``KubeRaySimulator.tick()`` itself (no thread, Ray jobs that end when the test says), and moves time by
rewriting the stored ``startTime``/``endTime`` into the past, so every transition is deterministic.

What each test holds the simulator to, in ``ray-operator/controllers/ray/rayjob_controller.go`` (tag v1.7.0):
``initRayJobStatusIfNeed`` (ids and ``startTime`` per attempt), ``checkBackoffLimitAndUpdateStatusIfNeeded``
(a retryable failure is written as Retrying with the failure, never as Failed; DeadlineExceeded is never
retried), the Retrying/Suspending case's reset, ``updateRayJobStatus`` (writes only when a state field changed;
``endTime`` on Complete/Failed), ``checkSubmitterAndUpdateStatusIfNeeded`` (SubmissionFailed),
``checkSubmitterFinishedTimeoutAndUpdateStatusIfNeeded``, ``checkTransitionGracePeriodAndUpdateStatusIfNeeded``,
``checkActiveDeadlineAndUpdateStatusIfNeeded``, ``checkPreRunningDeadlineAndUpdateStatusIfNeeded``,
``updateStatusToSuspendingIfNeeded``, ``handleShutdownAfterJobFinishes`` (the submitter Job stays),
``handleDeletionRules`` (``isDeletionRuleMatched``, ``isDeletionActionCompleted``, ``selectMostImpactfulRule``),
``handleLegacyDeletionPolicy``, ``validateRayJob`` from any state, and ``ManagedByExternalController``.
"""

from __future__ import annotations

import copy
import datetime
import re

from tests.k8s.apiserver import Store, now, rfc3339
from tests.k8s.kuberay_sim import FINALIZER, RAND, KubeRaySimulator, go_time
from tests.k8s.platform import install
from tests.k8s.scheduler_sim import node
from tests.k8s.rayjobs import rayjob, rule, with_spec

NS = "loomcfm"


class Manual:
    """A Ray job that runs until the test sets ``code`` (no thread); ``submission_fails``: the submitter never
    gets it submitted."""

    def __init__(self, submission_fails: bool = False):
        self.submission_fails, self.code, self.command = submission_fails, None, None

    def start(self, command, env, emit):
        self.command = command
        emit("step 1 of the training")

    def poll(self):
        return self.code

    def kill(self):
        self.code = -9 if self.code is None else self.code


class Stepped:
    """A store, a simulator that is not running, and the Ray jobs it started (``plan`` decides what they are)."""

    def __init__(self, body: dict, plan: dict | None = None, **sim):
        self.store, self.plan, self.jobs = Store(), plan or {}, []
        install(self.store, NS)
        self.sim = KubeRaySimulator(self.store, attempt=self._attempt, **sim)
        self.name = body["metadata"]["name"]
        self.store.create("rayjobs", NS, body)

    def _attempt(self, job, number):
        self.jobs.append(self.plan.get(number, Manual()))
        return self.jobs[-1]

    def rayjob(self) -> dict:
        return self.store.get("rayjobs", NS, self.name)

    def status(self) -> dict:
        return self.rayjob().get("status", {})

    def until(self, condition, limit: int = 30) -> None:
        for _ in range(limit):
            if condition(self.status()):
                return
            self.sim.tick()
        assert condition(self.status()), self.status()

    def ago(self, seconds: float, *path: str) -> str:
        """Move a status time ``seconds`` into the past (time passing, without waiting)."""
        job = self.rayjob()
        stamp = rfc3339(now() - datetime.timedelta(seconds=seconds))
        where = job["status"]
        for key in path[:-1]:
            where = where.setdefault(key, {})
        where[path[-1]] = stamp
        self.store.update("rayjobs", NS, job, status_only=True)
        return stamp

    def edit_spec(self, **spec) -> None:
        self.store.update("rayjobs", NS, with_spec(self.rayjob(), **spec))

    def clusters(self) -> list[dict]:
        return self.store.list("rayclusters", NS)

    def deployments(self) -> list[str]:
        return [s.get("jobDeploymentStatus", "New") for s in self.sim.statuses[self.name]]


def _running(status: dict) -> bool:
    return status.get("jobStatus") == "RUNNING"


NO_SHUTDOWN = {"shutdownAfterJobFinishes": None, "ttlSecondsAfterFinished": None}


def test_a_retry_is_written_as_retrying_then_a_new_attempt_with_new_ids_and_start_time():
    run = Stepped(rayjob("kube.backoff_limit=1"))
    run.until(_running)
    first = run.status()
    ids = re.compile(rf"^{run.name}-[{RAND}]{{5}}$")
    assert ids.match(first["jobId"]) and ids.match(first["rayClusterName"]) and first["jobId"] != first["rayClusterName"]
    assert first["dashboardURL"] == f"{first['rayClusterName']}-head-svc.{NS}.svc.cluster.local:8265"
    assert FINALIZER in run.rayjob()["metadata"]["finalizers"] and (first["failed"], first["succeeded"]) == (0, 0)
    old_start = run.ago(3600, "startTime")
    run.jobs[0].code = 1
    run.sim.tick()
    retry = run.status()
    assert (retry["jobDeploymentStatus"], retry["jobStatus"], retry["reason"], retry["failed"]) == \
        ("Retrying", "FAILED", "AppFailed", 1)
    assert retry["message"] == ("Job entrypoint command failed with exit code 1, last available logs (truncated to "
                                "20,000 chars):\nstep 1 of the training")
    assert "endTime" not in retry
    run.until(lambda s: s.get("jobDeploymentStatus") == "Initializing")
    reset = run.sim.statuses[run.name][run.deployments().index("New")]
    assert not {"jobId", "rayClusterName", "dashboardURL", "jobStatus", "reason", "message", "rayJobInfo"} & set(reset)
    assert reset["failed"] == 1, "the count survives the reset"
    second = run.status()
    assert second["jobId"] != first["jobId"] and second["rayClusterName"] != first["rayClusterName"]
    assert second["startTime"] > old_start, "deadlines count from each attempt's start"
    run.until(_running)
    run.jobs[1].code = 1
    run.sim.tick()
    final = run.status()
    assert (final["jobDeploymentStatus"], final["jobStatus"], final["reason"], final["failed"]) == \
        ("Failed", "FAILED", "AppFailed", 2) and final["endTime"]
    assert run.deployments().count("Failed") == 1 and run.deployments()[-1] == "Failed"
    for _ in range(5):
        run.sim.tick()
    assert run.store.created["rayclusters"] == 2 and run.status() == final, "no third attempt, nothing rewritten"


def test_success_is_counted_and_shutdown_after_job_finishes_deletes_only_the_cluster_after_its_ttl():
    run = Stepped(rayjob(ttlSecondsAfterFinished=600))  # the template's (kubectl's) TTL
    run.until(_running)
    run.jobs[0].code = 0
    run.sim.tick()
    done = run.status()
    assert (done["jobDeploymentStatus"], done["jobStatus"], done["succeeded"], done["failed"]) == \
        ("Complete", "SUCCEEDED", 1, 0)
    assert done["message"] == "Job finished successfully." and "reason" not in done and done["endTime"]
    assert done["rayJobInfo"]["startTime"] <= done["rayJobInfo"]["endTime"]
    for _ in range(3):
        run.sim.tick()
    assert run.clusters(), "ttlSecondsAfterFinished (600 s) has not passed"
    run.ago(601, "endTime")
    run.sim.tick()
    assert not run.clusters()
    (pod,) = run.store.list("pods", NS, f"job-name={run.name}")
    log = run.store.read_log(NS, pod["metadata"]["name"], {})
    assert run.store.get("jobs", NS, run.name) and f"Job '{done['jobId']}' succeeded" in log, \
        "the submitter Job (the driver's log) stays"


def test_a_failed_submission_matches_only_jobdeploymentstatus_rules_and_a_kept_head_goes_after_its_ttl():
    body = rayjob("kube.keep_cluster=true", "kube.keep_cluster_s=3600", "kube.backoff_limit=0")
    run = Stepped(body, plan={1: Manual(submission_fails=True)})
    run.until(lambda s: s.get("jobDeploymentStatus") == "Failed")
    failed = run.status()
    assert failed["reason"] == "SubmissionFailed" and "jobStatus" not in failed and failed["failed"] == 1
    assert failed["message"] == ("Job submission has failed. Reason: BackoffLimitExceeded. Message: Job has reached "
                                 "the specified backoff limit")
    run.sim.tick()  # DeleteWorkers (jobDeploymentStatus Failed, 0 s); the FAILED jobStatus rules do not match
    (cluster,) = run.clusters()
    assert all(g["suspend"] for g in cluster["spec"]["workerGroupSpecs"]), "workers suspended, head kept"
    generation = cluster["metadata"]["generation"]
    run.sim.tick()
    assert run.clusters()[0]["metadata"]["generation"] == generation, "a completed action is not repeated"
    run.ago(3601, "endTime")
    run.sim.tick()
    assert not run.clusters() and run.rayjob(), "DeleteCluster after keep_cluster_s; the RayJob stays"


def test_the_most_impactful_overdue_deletion_rule_runs_first():
    rules = [rule("DeleteWorkers", 0, jobStatus="FAILED"), rule("DeleteCluster", 0, jobStatus="FAILED")]
    run = Stepped(rayjob("kube.backoff_limit=0", **NO_SHUTDOWN, deletionStrategy={"deletionRules": rules}))
    run.until(_running)
    run.jobs[0].code = 2
    run.until(lambda s: s.get("jobDeploymentStatus") == "Failed")
    assert run.clusters()
    run.sim.tick()
    assert not run.clusters(), "DeleteCluster (3) outranks DeleteWorkers (2): one reconcile deletes the cluster"


def test_the_legacy_deletion_policy_uses_the_global_ttl():
    legacy = {"onSuccess": {"policy": "DeleteWorkers"}, "onFailure": {"policy": "DeleteCluster"}}
    run = Stepped(rayjob(**NO_SHUTDOWN, deletionStrategy=legacy))
    run.until(_running)
    run.jobs[0].code = 0
    run.until(lambda s: s.get("jobDeploymentStatus") == "Complete")
    run.sim.tick()
    (cluster,) = run.clusters()
    assert all(g["suspend"] for g in cluster["spec"]["workerGroupSpecs"]), "onSuccess: DeleteWorkers at once (TTL 0)"


def test_validation_failed_is_reached_from_any_state_and_never_left():
    run = Stepped(rayjob(ttlSecondsAfterFinished=600))
    run.until(_running)
    run.edit_spec(shutdownAfterJobFinishes=False)  # the ttlSecondsAfterFinished of 600 stays: invalid
    run.sim.tick()
    invalid = run.status()
    assert (invalid["jobDeploymentStatus"], invalid["reason"], invalid["failed"]) == \
        ("ValidationFailed", "ValidationFailed", 0) and "endTime" not in invalid
    assert invalid["message"] == ("The RayJob spec is invalid: a RayJob with shutdownAfterJobFinishes set to false "
                                  "cannot have TTLSecondsAfterFinished")
    run.edit_spec(shutdownAfterJobFinishes=True)  # fixed: the switch has no case for ValidationFailed
    version = run.rayjob()["metadata"]["resourceVersion"]
    for _ in range(5):
        run.sim.tick()
    assert run.status() == invalid and run.rayjob()["metadata"]["resourceVersion"] == version


def test_the_active_deadline_fails_for_good_and_the_pre_running_deadline_is_retried():
    run = Stepped(rayjob("kube.active_deadline_s=3600", "kube.backoff_limit=2"))
    run.until(_running)
    start = run.ago(7200, "startTime")
    run.sim.tick()
    over = run.status()
    assert (over["jobDeploymentStatus"], over["reason"], over["failed"], over["jobStatus"]) == \
        ("Failed", "DeadlineExceeded", 1, "RUNNING"), "not retried, though backoffLimit allows two more"
    assert over["message"] == (f"The RayJob has passed the activeDeadlineSeconds. StartTime: {go_time(start)}. "
                               "ActiveDeadlineSeconds: 3600")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+0000 UTC", go_time(start))
    waiting = Stepped(rayjob("kube.pre_running_deadline_s=60"), nodes=[node("small", cpu="1")])  # never ready
    waiting.until(lambda s: s.get("jobDeploymentStatus") == "Initializing")
    waiting.sim.tick()
    assert waiting.status()["jobDeploymentStatus"] == "Initializing", "the cluster is not ready yet: wait"
    waiting.ago(61, "startTime")
    waiting.sim.tick()
    retry = waiting.status()
    assert (retry["jobDeploymentStatus"], retry["reason"], retry["failed"]) == \
        ("Retrying", "PreRunningDeadlineExceeded", 1) and "jobStatus" not in retry


def test_suspend_tears_down_and_resume_starts_a_new_ray_job_without_counting_a_failure():
    run = Stepped(rayjob())
    run.until(_running)
    first_id = run.status()["jobId"]
    run.edit_spec(suspend=True)
    run.sim.tick()
    assert run.status()["jobDeploymentStatus"] == "Suspending"
    run.until(lambda s: s.get("jobDeploymentStatus") == "Suspended")
    assert not run.clusters() and not run.store.list("jobs", NS) and "jobId" not in run.status()
    version = run.rayjob()["metadata"]["resourceVersion"]
    for _ in range(3):
        run.sim.tick()
    assert run.rayjob()["metadata"]["resourceVersion"] == version, "Suspended stays, without requeue"
    run.edit_spec(suspend=False)
    run.until(_running)
    resumed = run.status()
    assert resumed["jobId"] != first_id and resumed["failed"] == 0 and len(run.jobs) == 2
    written = run.deployments()
    assert [s for i, s in enumerate(written) if i == 0 or written[i - 1] != s][-4:] == \
        ["Suspended", "New", "Initializing", "Running"]


def test_the_submitter_finished_timeout_and_the_transition_grace_period():
    run = Stepped(rayjob())
    run.until(_running)
    job = run.store.get("jobs", NS, run.name)  # the submitter says it finished 31 s ago; the Ray job still runs
    finished = now() - datetime.timedelta(seconds=31)
    job["status"] = {"conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": rfc3339(finished)}]}
    run.store.update("jobs", NS, job, status_only=True)
    run.sim.tick()
    late = run.status()
    assert (late["jobDeploymentStatus"], late["jobStatus"], late["reason"]) == \
        ("Retrying", "FAILED", "JobDeploymentStatusTransitionGracePeriodExceeded")
    assert late["message"] == (f"The RayJob submitter finished at {finished:%Y-%m-%d %H:%M:%S} but the ray job did "
                               "not reach terminal state within 30s")
    grace = Stepped(rayjob())
    grace.until(_running)
    job = grace.rayjob()  # the Ray job ended 301 s ago, and the RayJob never left Running
    job["status"]["jobStatus"] = "SUCCEEDED"
    grace.store.update("rayjobs", NS, job, status_only=True)
    grace.ago(301, "rayJobInfo", "endTime")
    grace.sim.tick()
    over = grace.status()
    assert (over["jobDeploymentStatus"], over["jobStatus"], over["reason"], over["succeeded"]) == \
        ("Complete", "SUCCEEDED", "JobDeploymentStatusTransitionGracePeriodExceeded", 1)


def test_status_is_written_only_when_a_state_field_changes():
    run = Stepped(rayjob())
    run.until(_running)
    job = run.rayjob()
    version = job["metadata"]["resourceVersion"]
    changed = copy.deepcopy(job)
    changed["status"]["message"] = "Job is still running, with another message."
    run.sim._update_status(job, changed)
    assert run.rayjob()["metadata"]["resourceVersion"] == version, "a message alone is not persisted"
    changed["status"]["jobStatus"] = "STOPPED"
    run.sim._update_status(job, changed)
    assert run.status()["jobStatus"] == "STOPPED" and run.status()["message"].startswith("Job is still running")
    assert "endTime" not in run.status(), "endTime only with Complete or Failed"


def test_a_rayjob_managed_by_another_controller_is_left_alone():
    run = Stepped(rayjob(managedBy="kueue.x-k8s.io/multikueue"))
    for _ in range(5):
        run.sim.tick()
    job = run.rayjob()
    assert "status" not in job and not job["metadata"].get("finalizers") and not run.clusters()
