"""The RayJob launcher (loomcfm_core/kube/) against a KubeRay v1.7.0 controller simulator behind a Kubernetes
API server on 127.0.0.1 (tests/k8s/kuberay_sim.py, tests/k8s/apiserver.py), through the real ``kubernetes``
client and a kubeconfig, as from a laptop: KubeRay's lifecycle with retries, deadlines, validation, API-server
errors, adoption, SIGTERM and what no signal reaches, the cluster shape, keep_cluster (a retry that really resumes a
training runs on pods that are hosts: tests/k8s/test_pods_as_hosts.py)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from loomcfm_core import layout, stages
from loomcfm_core.checkpoint import list_checkpoints, write_state
from loomcfm_core.config import load_config, load_config_text
from loomcfm_core.errors import CheckpointError, LeaseError, RayJobError
from loomcfm_core.kube.client import connect
from loomcfm_core.kube.launcher import run_rayjob
from loomcfm_core.kube.rayjob import (CONFIG_ENV, RUN_KEY_LABEL, RunIdentity, build_rayjob, cluster_config,
                                      containers, load_template)
from loomcfm_core.lease import LEASE_FILE, Lease
from loomcfm_core.storage import join, storage_for
from tests.k8s.apiserver import ApiError, ApiServer, admit
from tests.k8s.kuberay_rules import validate_metadata, validate_rayjob
from tests.k8s.kuberay_sim import KubeRaySimulator, Scripted
from tests.k8s.objects import find, render
from tests.k8s.platform import RUNNER, install, token
from tests.k8s.scheduler_sim import node

NS = "ml"
FAST = {"patience_s": 5.0, "retry_base_s": 0.05, "teardown_s": 1.0, "margin_s": 2.0, "gone_wait_s": 10.0}
REPO = Path(__file__).resolve().parents[2]


class Cluster:
    """An API server with KubeRay's controller, and the kubeconfig that points at them."""

    def __init__(self, server: ApiServer, sim: KubeRaySimulator):
        self.server, self.sim, self.store = server, sim, server.store
        self.plan: dict[int, Scripted] = {}

    def rayjob(self, name: str) -> dict | None:
        return next((j for j in self.store.list("rayjobs", NS) if j["metadata"]["name"] == name), None)

    def read_once_more(self) -> None:
        """Wait until the launcher has read the RayJob once more: a GET that arrives now sees what is stored now."""
        reads = self.store.requests.count(("get", "rayjobs"))
        self.wait_for(lambda: self.store.requests.count(("get", "rayjobs")) > reads, "the launcher to read")

    def hold_until_read(self, state) -> None:
        """Keep the operator from moving on after it wrote a status that ``state(status)`` selects until the
        launcher has read it (Retrying lasts two of its ticks, which a loaded machine's launcher can miss)."""
        self.sim.after_write = lambda name, status: self.read_once_more() if state(status) else None

    def wait_for(self, condition, what: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while not (result := condition()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            assert not self.sim.errors, self.sim.errors
            time.sleep(0.05)
        return result


@pytest.fixture()
def cluster(tmp_path, monkeypatch):
    """``plan[k]`` is the k-th Ray job the test starts (any RayJob, any attempt); unplanned ones succeed."""
    plan: dict[int, Scripted] = {}
    started = itertools.count(1)
    with ApiServer() as server, KubeRaySimulator(server.store,
                                                 attempt=lambda job, n: plan.get(next(started), Scripted())) as sim:
        install(server.store, NS)
        monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig", NS)))
        for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
            monkeypatch.delenv(var, raising=False)  # not in a pod: the kubeconfig is used
        c = Cluster(server, sim)
        c.plan = plan
        yield c
    assert not sim.errors, sim.errors


def _cfg(*overrides: str):
    return load_config("digits", ["storage.root=s3://bucket/loomcfm", f"kube.namespace={NS}", "kube.poll_s=0.05",
                                  *overrides])


def _body(cfg, identity: RunIdentity | None = None) -> dict:
    return build_rayjob(load_template(), cfg, identity or RunIdentity("s3://bucket/loomcfm/runs/digits-0123"),
                        ["--dataset", "s3://bucket/loomcfm/datasets/digits-x"])


def _launch(cfg, body=None, **tuning):
    return run_rayjob(connect(NS), body or _body(cfg), cfg.kube, **{**FAST, **tuning})


def _states(history: list[str]) -> list[str]:
    return [s for i, s in enumerate(history) if i == 0 or history[i - 1] != s]


def test_success_follows_kuberays_lifecycle_copies_the_driver_log_and_cleans_up(cluster, caplog):
    caplog.set_level("INFO")
    cluster.plan[1] = Scripted(lines=("epoch 1: loss 0.5", "epoch 2: loss 0.4"))
    body = _body(_cfg())
    status = _launch(_cfg(), body)
    name = body["metadata"]["name"]
    assert status["jobDeploymentStatus"] == "Complete" and status["jobStatus"] == "SUCCEEDED"
    assert status["succeeded"] == 1 and status["failed"] == 0
    assert _states(cluster.sim.history[name]) == ["Initializing", "Running", "Complete"]
    assert f"[{name}] epoch 2: loss 0.4" in caplog.text and f"Job '{status['jobId']}' succeeded" in caplog.text
    assert "Complete job=SUCCEEDED (attempt 1/3" in caplog.text
    cluster.wait_for(lambda: not cluster.store.list("rayjobs", NS), "the RayJob to go")
    assert not cluster.store.list("rayclusters", NS) and not cluster.store.list("pods", NS), "GC took the rest"
    assert cluster.store.created["rayjobs"] == 1


def test_the_launchers_api_calls_are_what_its_role_grants(cluster, tmp_path, monkeypatch):
    """As KFP's pipeline-runner, bound to k8s/base's Role: the API double's RBAC refuses nothing, and the Role
    grants no verb the launcher does not use but the reaper's list and kubectl's watch."""
    monkeypatch.setenv("KUBECONFIG", str(cluster.server.kubeconfig(tmp_path / "runner", NS, token(cluster.store,
                                                                                                  *RUNNER))))
    _launch(_cfg())
    used = set(cluster.store.requests)
    assert not cluster.store.denied, cluster.store.denied
    role = find(render("base"), "Role", "loomcfm-rayjob-launcher")[0]
    granted = {(verb, resource) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}
    assert used >= {("create", "rayjobs"), ("get", "rayjobs"), ("delete", "rayjobs"), ("list", "pods"),
                    ("get", "pods/log"), ("list", "events")}
    assert used <= granted, used - granted


def test_a_failed_attempt_is_retried_and_watched_to_success(cluster, caplog):
    caplog.set_level("INFO")
    cluster.plan.update({1: Scripted(exit_code=1, lines=("Traceback ...", "RuntimeError: node lost")),
                         2: Scripted(lines=("resumed from step 20",))})
    # the launcher sees Retrying (its reason) and the second attempt before it ends
    cluster.hold_until_read(lambda s: s.get("jobDeploymentStatus") in ("Retrying", "Running") and s.get("failed"))
    body = _body(_cfg())
    status = _launch(_cfg(), body)
    name = body["metadata"]["name"]
    assert status["jobStatus"] == "SUCCEEDED" and status["failed"] == 1 and status["succeeded"] == 1
    assert _states(cluster.sim.history[name]) == ["Initializing", "Running", "Retrying", "New", "Initializing",
                                                  "Running", "Complete"]
    assert "attempt 2/3 started" in caplog.text and "the previous one failed (AppFailed: Job entrypoint command " \
        "failed with exit code 1, last available logs (truncated to 20,000 chars): ... RuntimeError: node lost)" \
        in caplog.text
    assert f"[{name}] resumed from step 20" in caplog.text
    assert cluster.store.created["rayjobs"] == 1 and cluster.store.created["rayclusters"] == 2


def test_the_last_failure_raises_with_kuberays_reason_message_and_attempts(cluster):
    cluster.plan.update({n: Scripted(exit_code=1, lines=("ValueError: data.source is broken",)) for n in (1, 2)})
    cfg = _cfg("kube.backoff_limit=1")
    body = _body(cfg)
    name = body["metadata"]["name"]
    with pytest.raises(RayJobError) as info:
        _launch(cfg, body)
    text = str(info.value)
    assert f"RayJob {NS}/{name} ended Failed after 2 of 2 attempt(s) (kube.backoff_limit=1): AppFailed" in text
    assert "Job entrypoint command failed with exit code 1" in text and "ValueError: data.source is broken" in text
    assert f"kubectl -n {NS} describe rayjob {name}; kubectl -n {NS} logs -l job-name={name}" in text
    assert "its Ray cluster is gone (kube.keep_cluster=false); the RayJob and its submitter's log stay" in text
    assert _states(cluster.sim.history[name])[-1] == "Failed"
    # what the error's kubectl commands show is still there; the cluster is not (ttlSecondsAfterFinished 0)
    assert body["spec"]["shutdownAfterJobFinishes"] is True and body["spec"]["ttlSecondsAfterFinished"] == 0
    cluster.wait_for(lambda: not cluster.store.list("rayclusters", NS), "the failed RayJob's cluster to go")
    assert cluster.rayjob(name)["status"]["reason"] == "AppFailed"
    (pod,) = cluster.store.list("pods", NS, f"job-name={name}")
    assert "ValueError: data.source is broken" in cluster.store.read_log(NS, pod["metadata"]["name"], {})


def test_a_stopped_ray_job_is_a_failure_not_a_success(cluster):
    """`ray job stop` (the dashboard's stop) ends the Ray job STOPPED; KubeRay then writes Complete."""
    hold = threading.Event()
    cluster.plan[1] = Scripted(hold=hold)

    def stop_it():
        run = cluster.wait_for(lambda: next((r for r in cluster.sim.runs.values() if r.status == "RUNNING"), None),
                               "the Ray job")
        cluster.sim.stop_job(run.job_id)

    threading.Thread(target=stop_it, daemon=True).start()
    body = _body(_cfg())
    try:
        with pytest.raises(RayJobError, match=r"RayJob ml/\S+ was stopped after 1 of 3 attempt\(s\) \(kube.backoff_limit"
                           r"=2\): STOPPED\nJob was intentionally stopped."):
            _launch(_cfg(), body)
    finally:
        hold.set()
    assert cluster.rayjob(body["metadata"]["name"])["status"]["jobDeploymentStatus"] == "Complete"


def test_a_suspended_and_resumed_rayjob_is_watched_to_its_end(cluster, caplog):
    """Suspending and Suspended are not terminal (Kueue, or kubectl patch spec.suspend): the launcher waits, and
    the resumed RayJob's new Ray job is not counted as a failed attempt."""
    caplog.set_level("INFO")
    hold = threading.Event()
    cluster.plan[1] = Scripted(hold=hold)
    body = _body(_cfg())
    name = body["metadata"]["name"]

    def suspend(flag: bool) -> None:
        while True:  # the operator writes too: read, change, write until no conflict
            job = cluster.store.get("rayjobs", NS, name)
            job["spec"]["suspend"] = flag
            try:
                cluster.store.update("rayjobs", NS, job)
                return
            except ApiError as exc:
                assert exc.reason == "Conflict"

    def operator():
        cluster.wait_for(lambda: cluster.sim.runs, "the Ray job")
        suspend(True)
        cluster.wait_for(lambda: "Suspended" in cluster.sim.history.get(name, []), "Suspended")
        suspend(False)

    # the launcher sees Suspended, and the resumed RayJob's Ray job before it ends
    cluster.hold_until_read(lambda s: s.get("jobDeploymentStatus") == "Suspended" or s.get("jobStatus") == "RUNNING")
    threading.Thread(target=operator, daemon=True).start()
    try:
        status = _launch(_cfg(), body)
    finally:
        hold.set()
    assert status["jobStatus"] == "SUCCEEDED" and status["failed"] == 0
    assert "Suspended (attempt 1/3" in caplog.text
    assert "the RayJob was suspended and resumed" in caplog.text and "the previous one failed" not in caplog.text


def test_validation_failed_ends_the_wait_with_kuberays_message(cluster):
    """The old keep_cluster form (shutdownAfterJobFinishes false with a TTL) is what KubeRay rejects."""
    body = _body(_cfg())
    body["spec"].update(shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=600)
    assert validate_rayjob(body) == ("The RayJob spec is invalid: a RayJob with shutdownAfterJobFinishes set to "
                                     "false cannot have TTLSecondsAfterFinished")
    with pytest.raises(RayJobError, match=r"ended ValidationFailed after 0 of 3 attempt\(s\).*ValidationFailed\n"
                       r"The RayJob spec is invalid: a RayJob with shutdownAfterJobFinishes set to false cannot have "
                       r"TTLSecondsAfterFinished"):
        _launch(_cfg(), body)


def test_keep_cluster_is_valid_and_keeps_a_failed_head_but_not_its_workers(cluster):
    cfg = _cfg("kube.keep_cluster=true", "kube.keep_cluster_s=3600", "kube.backoff_limit=0")
    body = _body(cfg)
    assert "shutdownAfterJobFinishes" not in body["spec"] and "ttlSecondsAfterFinished" not in body["spec"]
    admit("RayJob", json.loads(json.dumps(body)), strict=True)
    assert validate_rayjob(body) is None
    cluster.plan[1] = Scripted(exit_code=3, lines=("CUDA error: out of memory",))
    with pytest.raises(RayJobError, match=r"its head pod stays for kube.keep_cluster_s=3600 s: kubectl -n ml logs -l "
                       r"ray.io/cluster=loomcfm-train-\w+-\w+,ray.io/node-type=head"):
        _launch(cfg, body)
    name = body["metadata"]["name"]
    assert cluster.rayjob(name) is not None, "a failed RayJob kept for post-mortem stays"
    (ray_cluster,) = cluster.wait_for(lambda: [c for c in cluster.store.list("rayclusters", NS)
                                               if all(g.get("suspend") for g in c["spec"]["workerGroupSpecs"])],
                                      "DeleteWorkers to suspend the worker groups")
    time.sleep(0.3)
    assert cluster.store.list("rayclusters", NS), "the head stays for keep_cluster_s"


def test_keep_cluster_leaves_no_cluster_of_a_stopped_job(cluster):
    """KubeRay writes a stopped Ray job as Complete, and no deletion rule can match STOPPED (the CRD's
    condition.jobStatus enum is SUCCEEDED and FAILED): the launcher deletes the RayJob and its cluster."""
    hold = threading.Event()
    cluster.plan[1] = Scripted(hold=hold)
    threading.Thread(target=lambda: cluster.sim.stop_job(cluster.wait_for(
        lambda: next((r.job_id for r in cluster.sim.runs.values() if r.status == "RUNNING"), None), "the job")),
        daemon=True).start()
    cfg = _cfg("kube.keep_cluster=true")
    try:
        with pytest.raises(RayJobError, match=r"(?s)was stopped after 1 of 3 attempt.*\nJob was intentionally "
                           r"stopped.\n.*\nit is deleted with its cluster"):
            _launch(cfg)
    finally:
        hold.set()
    cluster.wait_for(lambda: not cluster.store.list("rayjobs", NS) and not cluster.store.list("rayclusters", NS),
                     "the stopped job's RayJob and cluster to go")


def test_keep_cluster_deletes_the_cluster_of_a_success_at_once(cluster):
    cfg = _cfg("kube.keep_cluster=true")
    body = _body(cfg)
    _launch(cfg, body)
    assert cluster.rayjob(body["metadata"]["name"]) is not None, "keep_cluster leaves the RayJob"
    cluster.wait_for(lambda: not cluster.store.list("rayclusters", NS), "DeleteCluster on SUCCEEDED")


def test_deadline_exceeded_is_not_retried(cluster):
    hold = threading.Event()
    cluster.plan[1] = Scripted(hold=hold)
    try:
        with pytest.raises(RayJobError, match=r"ended Failed after 1 of 3 attempt\(s\).*DeadlineExceeded\nThe RayJob "
                           r"has passed the activeDeadlineSeconds"):
            _launch(_cfg("kube.active_deadline_s=1"))
    finally:
        hold.set()


def test_pre_running_deadline_is_retried_until_the_backoff_limit(tmp_path, monkeypatch):
    """Each attempt gets a RayCluster of its own. KubeRay checks the deadline before it creates an attempt's
    cluster (``rayjob_controller.go``, Initializing), so a deadline shorter than a reconcile under load can end
    an attempt before its cluster exists: 3 s, not 1 (CI: one cluster for two attempts)."""
    with ApiServer() as server, KubeRaySimulator(server.store, nodes=[node("small", cpu="1")]) as sim:
        install(server.store, NS)
        monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig", NS)))
        cfg = _cfg("kube.pre_running_deadline_s=3", "kube.backoff_limit=1")
        with pytest.raises(RayJobError, match=r"ended Failed after 2 of 2 attempt\(s\).*PreRunningDeadlineExceeded"):
            _launch(cfg)
        assert server.store.created["rayclusters"] == 2 and not sim.errors


def test_api_server_errors_are_ridden_out_and_a_committed_create_is_adopted(cluster, caplog):
    caplog.set_level("INFO")
    cluster.store.commit_then_fail(1)  # the create is stored, then answered 504
    cluster.store.fail_next(3, 503)
    cluster.store.fail_next(1, 429)
    hold = threading.Event()
    cluster.plan[1] = Scripted(hold=hold)
    watching = lambda: cluster.store.requests.count(("get", "rayjobs")) >= 3  # noqa: E731 (adopted, then reads)
    watcher = threading.Thread(target=lambda: (cluster.wait_for(watching, "the launcher to watch"),
                                               cluster.store.fail_next(4, 500), hold.set()), daemon=True)
    watcher.start()
    status = _launch(_cfg())
    assert status["jobStatus"] == "SUCCEEDED" and cluster.store.created["rayjobs"] == 1
    assert "adopting RayJob" in caplog.text and "trying again" in caplog.text


def test_an_api_server_that_stays_down_is_a_clear_error(cluster):
    hold = threading.Event()
    cluster.plan[1] = Scripted(hold=hold)
    threading.Thread(target=lambda: (cluster.wait_for(lambda: cluster.sim.runs, "the Ray job"),
                                     cluster.store.fail_next(10_000, 503)), daemon=True).start()
    try:
        with pytest.raises(RayJobError, match=r"cannot read RayJob ml/loomcfm-train-\w+: the Kubernetes API failed "
                           r"\d+ times in a row over \d+ s; last: 503 ServiceUnavailable"):
            _launch(_cfg(), patience_s=1.0)
    finally:
        cluster.store.clear_faults()
        hold.set()


def test_a_rayjob_deleted_by_someone_else_ends_the_wait(cluster):
    hold = threading.Event()
    cluster.plan[1] = Scripted(hold=hold)
    body = _body(_cfg())
    name = body["metadata"]["name"]
    threading.Thread(target=lambda: (cluster.wait_for(lambda: cluster.sim.runs, "the Ray job"),
                                     cluster.store.delete("rayjobs", NS, name)), daemon=True).start()
    with pytest.raises(RayJobError, match=f"RayJob {NS}/{name} was deleted while the launcher watched it"):
        _launch(_cfg(), body)
    assert next(iter(cluster.sim.runs.values())).status == "STOPPED", "the finalizer stopped the Ray job"


def test_the_launchers_time_bound_when_kuberay_is_not_running(cluster):
    cluster.sim.pause()  # the operator is down: nothing ever advances the RayJob
    with pytest.raises(RayJobError, match=r"did not end within 3 s = 1 attempt\(s\) x kube.active_deadline_s=1 \+ 0 "
                       r"retries x 1 s \+ 2 s; KubeRay should have ended it: is its operator running"):
        _launch(_cfg("kube.active_deadline_s=1", "kube.backoff_limit=0"))


def test_an_earlier_tries_failed_rayjob_is_replaced_and_one_being_deleted_is_waited_for(cluster, caplog):
    caplog.set_level("INFO")
    identity = RunIdentity("s3://bucket/loomcfm/runs/digits-0123", "2f0c9e2a-aaaa-bbbb-cccc-0123456789ab", "train")
    cluster.plan[1] = Scripted(exit_code=1)  # the first try's RayJob fails and is kept; the others succeed
    kept = _cfg("kube.keep_cluster=true", "kube.backoff_limit=0")
    with pytest.raises(RayJobError):
        _launch(kept, _body(kept, identity))
    assert cluster.store.list("rayjobs", NS), "kept"
    status = _launch(_cfg(), _body(_cfg(), identity))  # the KFP retry of the same task
    assert status["jobStatus"] == "SUCCEEDED" and cluster.store.created["rayjobs"] == 2
    assert "of an earlier try ended Failed job=FAILED reason=AppFailed; replacing it" in caplog.text
    # one being deleted (the operator is slow to remove its finalizer): wait, then create
    body = _body(kept, identity)
    _launch(kept, body)
    cluster.sim.pause()
    cluster.store.delete("rayjobs", NS, body["metadata"]["name"])
    threading.Timer(0.5, cluster.sim.paused.clear).start()
    _launch(_cfg(), body)
    assert "is being deleted; waiting for it to go" in caplog.text and cluster.store.created["rayjobs"] == 4


def test_a_name_collision_with_another_runs_rayjob_is_refused(cluster):
    body = _body(_cfg())
    other = json.loads(json.dumps(body))
    other["metadata"]["labels"][RUN_KEY_LABEL] = "someone-else"
    cluster.store.create("rayjobs", NS, other)
    with pytest.raises(RayJobError, match=r"exists but is not this run's \(loomcfm.io/run-key='someone-else'"):
        _launch(_cfg(), body)


def test_an_invalid_body_is_refused_by_the_api_server(cluster):
    body = _body(_cfg())
    body["spec"]["preRunningDeadlineSeconds"] = 0
    with pytest.raises(RayJobError, match=r"cannot create RayJob ml/\S+: 422 Invalid: .*preRunningDeadlineSeconds"):
        _launch(_cfg(), body)
    body = _body(_cfg())
    body["spec"]["shutdownAfterJobFinsihes"] = True
    with pytest.raises(RayJobError, match=r'400 BadRequest: .*strict decoding error: unknown field '
                       r'"spec.shutdownAfterJobFinsihes"'):
        _launch(_cfg(), body)
    assert cluster.store.created["rayjobs"] == 0


# ---- identity and shape -------------------------------------------------------------------------------------

def test_rayjob_names_are_stable_dns1035_labels_kuberay_accepts():
    uuid = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"  # KFP run ids are UUIDs, may start with a digit
    names = set()
    for task in ("train", "train-2", "a" * 80, "Train_Reflow.Final"):
        identity = RunIdentity("s3://b/runs/x", uuid, task)
        name = identity.name()
        assert name == RunIdentity("s3://b/runs/x", uuid, task).name(), "a retried step derives the same name"
        assert validate_metadata({"name": name}) is None and len(name) <= 39, name
        names.add(name)
        assert all(len(v) <= 63 for v in identity.labels().values())
    assert len(names) == 4
    assert RunIdentity("s3://b/runs/x").name() != RunIdentity("s3://b/runs/y").name()
    assert RunIdentity("s3://b/runs/x").name("reflow").startswith("loomcfm-reflow-")
    cli = RunIdentity("s3://b/runs/x")
    assert cli.annotations() == {"loomcfm.io/run-folder": "s3://b/runs/x"} and "loomcfm.io/kfp-run-id" not in cli.labels()


def test_four_workers_with_two_gpus_each_make_eight_ray_train_workers(cluster):
    cfg = _cfg("kube.ray_workers=4", "kube.gpus_per_worker=2", "kube.worker_cpu=16", "kube.worker_memory=64Gi",
               "kube.gpu_node_selector=nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3",
               "kube.image=registry.corp/ml/loomcfm:1.2")
    body = _body(cfg)
    (group,) = body["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    pod = group["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "2"}
    assert pod["containers"][0]["resources"]["requests"] == limits
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    head = body["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    trained = load_config_text(next(e["value"] for e in head["env"] if e["name"] == CONFIG_ENV))
    assert trained.ray.num_workers == 8 and trained.ray.use_gpu is True and trained.ray.address == "auto"
    assert trained.ray.cpus_per_worker == 8.0 and trained == cluster_config(cfg)
    assert trained.model_dump(exclude={"ray"}) == cfg.model_dump(exclude={"ray"}), "only ray.* is derived"
    images = {c["image"] for c in containers(body)}
    assert images == {"registry.corp/ml/loomcfm:1.2"}
    admit("RayJob", json.loads(json.dumps(body)), strict=True)
    assert validate_rayjob(body) is None
    gpu_taint = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    for i in range(4):  # a GPU node pool: the workers go there, one per node
        cluster.store.apply(node(f"gpu-{i}", cpu="32", memory="128Gi", gpus=2, taints=[gpu_taint],
                                 labels={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}))
    assert _launch(cfg, body)["jobStatus"] == "SUCCEEDED"
    bound = [e["message"].rsplit(" ", 1)[1] for e in cluster.store.list("events", NS, fields="reason=Scheduled")
             if "-workers-worker-" in e["involvedObject"]["name"]]
    assert sorted(bound) == [f"gpu-{i}" for i in range(4)], "one worker per GPU node"


def test_the_launcher_reads_the_run_folder_its_rayjob_trains_into(monkeypatch):
    """The RayJob trains with ray.* derived from the kube shape (2 workers here, 1 in the preset), part of the run's
    identity: the folder the launcher names, reads back and rewinds is that config's."""
    bodies = []

    def capture(api, body, kube, **tuning):
        bodies.append(body)
        raise RayJobError("captured")

    monkeypatch.setattr(stages, "run_rayjob", capture)
    monkeypatch.setattr(stages, "connect", lambda namespace: None)
    cfg = _cfg("kube.ray_workers=2")
    with pytest.raises(RayJobError, match="captured"):
        stages.train(cfg, "s3://bucket/loomcfm/datasets/digits-x", launcher="rayjob")
    head = bodies[0]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    trained = load_config_text(next(e["value"] for e in head["env"] if e["name"] == CONFIG_ENV))
    folder = layout.run_uri(trained, "s3://bucket/loomcfm/datasets/digits-x")
    assert bodies[0]["metadata"]["annotations"]["loomcfm.io/run-folder"] == folder != \
        layout.run_uri(cfg, "s3://bucket/loomcfm/datasets/digits-x")


def test_cpu_workers_share_nothing_but_their_pod():
    cfg = _cfg("kube.ray_workers=3", "kube.worker_cpu=2500m")
    body = _body(cfg)
    pod = body["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"] and "nodeSelector" not in pod
    ray = cluster_config(cfg).ray
    assert (ray.num_workers, ray.use_gpu, ray.cpus_per_worker) == (3, False, 2.5)


def test_train_rejects_what_cannot_work(tmp_path):
    cfg = load_config("digits", [f"storage.root={tmp_path}/store"])
    with pytest.raises(ValueError, match=r"launcher=rayjob needs storage.root on shared storage \(s3://"):
        stages.train(cfg, "s3://b/d", launcher="rayjob")
    with pytest.raises(ValueError, match="needs init_from"):
        stages.train(cfg, "s3://b/d", pairs_uri="s3://b/pairs")
    with pytest.raises(ValueError, match="launcher must be"):
        stages.train(cfg, "s3://b/d", launcher="slurm")
    with pytest.raises(ValueError, match=r"kube.on_terminate"):
        load_config("digits", ["kube.on_terminate=keep"])


def test_resume_step_rewinds_under_the_lease_before_the_rayjob_and_a_retry_resumes_from_the_latest(cluster,
                                                                                                     s3_bucket):
    """``loomcfm train --launcher rayjob --resume-step 2``: the launcher sets the later checkpoint aside under the
    run's lease (released again) before it creates the RayJob, whose entrypoint has no ``--resume-step``; so
    KubeRay's retry after a failed attempt resumes from what that attempt saved instead of rewinding again. A
    missing step, or a folder another training holds, fails before any RayJob exists, with nothing moved."""
    cfg = _cfg(f"storage.root=s3://{s3_bucket}/loomcfm", "kube.backoff_limit=1")
    dataset_uri = f"s3://{s3_bucket}/loomcfm/datasets/digits-x"
    run_uri = layout.run_uri(cfg, dataset_uri)
    for step in (2, 4):
        write_state({"step": step}, f"{layout.checkpoint_dir(run_uri)}/step-{step:08d}.pt")
    with pytest.raises(CheckpointError, match=r"--resume-step 3: .* \(steps: 2, 4;"):
        stages.train(cfg, dataset_uri, launcher="rayjob", resume_step=3)
    with Lease(run_uri, 60), pytest.raises(LeaseError):
        stages.train(cfg, dataset_uri, launcher="rayjob", resume_step=2)
    assert [s for s, _ in list_checkpoints(run_uri)] == [2, 4] and not cluster.store.created.get("rayjobs")

    seen = []

    class Attempt(Scripted):
        def start(self, command, env, emit):
            lease_held = storage_for(run_uri).exists(join(run_uri, LEASE_FILE))
            seen.append((command, [s for s, _ in list_checkpoints(run_uri)], lease_held))
            if len(seen) == 1:  # the first attempt trains to step 3, then fails
                write_state({"step": 3}, f"{layout.checkpoint_dir(run_uri)}/step-00000003.pt")
            super().start(command, env, emit)

    cluster.plan.update({1: Attempt(exit_code=1), 2: Attempt(exit_code=1)})
    with pytest.raises(RayJobError, match=r"after 2 of 2 attempt"):
        stages.train(cfg, dataset_uri, launcher="rayjob", resume_step=2)
    assert [(checkpoints, held) for _, checkpoints, held in seen] == [([2], False), ([2, 3], False)]
    assert all("loomcfm train" in command and "--resume-step" not in command for command, _, _ in seen)
    assert storage_for(run_uri).exists(join(run_uri, "set-aside", "step-00000004.pt"))
    assert cluster.store.created["rayjobs"] == 1


# ---- SIGTERM and adoption, in real processes -----------------------------------------------------------------

def _env(cluster: Cluster) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env["KUBECONFIG"] = os.environ["KUBECONFIG"]
    return env


def _terminate_when_running(cluster: Cluster, proc: subprocess.Popen) -> str:
    cluster.wait_for(lambda: any(r.status == "RUNNING" for r in cluster.sim.runs.values()) or proc.poll() is not None,
                     "the training to run", timeout=120)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    time.sleep(0.3)  # the launcher is watching now
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out[-3000:]
    return out


@pytest.mark.process
def test_sigterm_deletes_the_rayjob_from_the_cli_launcher(cluster):
    """`loomcfm train --launcher rayjob` from a laptop (its kubeconfig), then SIGTERM (Ctrl-C or kill)."""
    hold = threading.Event()
    cluster.plan[1] = Scripted(hold=hold)
    cmd = [sys.executable, "-m", "loomcfm_core.cli", "train", "--launcher", "rayjob",
           "--dataset", "s3://bucket/loomcfm/datasets/digits-x"]
    for item in ("storage.root=s3://bucket/loomcfm", f"kube.namespace={NS}", "kube.poll_s=0.1"):
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, env=_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = _terminate_when_running(cluster, proc)
        assert "loomcfm: error: terminated while watching RayJob ml/loomcfm-train-" in out
        assert "deleted it: KubeRay stops the Ray job and removes its cluster" in out
        cluster.wait_for(lambda: not cluster.store.list("rayjobs", NS), "the RayJob to go (finalizer removed)")
        assert [r.status for r in cluster.sim.runs.values()] == ["STOPPED"], "the finalizer stopped the Ray job"
    finally:
        hold.set()


@pytest.mark.process
def test_sigterm_deletes_the_rayjob_first_though_a_sigkill_follows_at_once(cluster):
    """A terminated KFP step: the emissary forwards SIGTERM to the step's process group, the KFP launcher dies
    of it and the container goes with PID 1 about a second later (argo-workflows v4.0.5 emissary.go,
    kubeflow/pipelines 2.17.0 launcher_v2.go). The handler's first act is the DELETE; a SIGKILL 0.3 s later
    finds it done."""
    hold = threading.Event()
    cluster.plan[1] = Scripted(hold=hold)
    cmd = [sys.executable, "-m", "loomcfm_core.cli", "train", "--launcher", "rayjob",
           "--dataset", "s3://bucket/loomcfm/datasets/digits-x"]
    for item in ("storage.root=s3://bucket/loomcfm", f"kube.namespace={NS}", "kube.poll_s=5"):
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, env=_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        cluster.wait_for(lambda: any(r.status == "RUNNING" for r in cluster.sim.runs.values()), "the training",
                         timeout=120)
        time.sleep(0.5)  # the launcher is in its 5 s wait between reads
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.kill()
        proc.communicate(timeout=30)
        cluster.wait_for(lambda: not cluster.store.list("rayjobs", NS), "the RayJob to go")
        assert [r.status for r in cluster.sim.runs.values()] == ["STOPPED"]
    finally:
        hold.set()


@pytest.mark.process
def test_a_step_killed_without_a_signal_leaves_a_rayjob_that_goes_with_its_pod(cluster, tmp_path):
    """No signal at all (SIGKILL, a Pending pod deleted by Argo): the RayJob carries an ownerReference to its
    step pod (KFP_POD_NAME/KFP_POD_UID, same namespace), so when the pod object goes (the Workflow's garbage
    collection) the garbage collector deletes the RayJob, and KubeRay's finalizer stops the Ray job."""
    hold = threading.Event()
    cluster.plan[1] = Scripted(hold=hold)
    pod = cluster.store.create("pods", NS, {"metadata": {"name": "loomcfm-abc-system-container-impl-1"}, "spec": {
        "containers": [{"name": "main", "image": "ghcr.io/loomcfm/loomcfm:0.1.0", "command": ["sleep", "600"]}]}})[0]
    (tmp_path / "namespace").write_text(NS)
    env = {**_env(cluster), "KFP_POD_NAME": pod["metadata"]["name"], "KFP_POD_UID": pod["metadata"]["uid"]}
    step = textwrap.dedent(f"""
        from loomcfm_core import kfp_env, stages
        from loomcfm_core.config import load_config
        kfp_env.NAMESPACE_FILE = {str(tmp_path / "namespace")!r}  # where a pod's ServiceAccount mount has it
        cfg = load_config("digits", ["storage.root=s3://bucket/loomcfm", "kube.namespace={NS}", "kube.poll_s=0.1"])
        stages.train(cfg, "s3://bucket/loomcfm/datasets/digits-x", launcher="rayjob", kfp_run_id="r-1",
                            kfp_task="train")
    """)
    proc = subprocess.Popen([sys.executable, "-c", step], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        cluster.wait_for(lambda: any(r.status == "RUNNING" for r in cluster.sim.runs.values()) or proc.poll(),
                         "the training", timeout=120)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        proc.kill()
        proc.communicate(timeout=30)
        (job,) = cluster.store.list("rayjobs", NS)
        assert job["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": pod["metadata"][
            "name"], "uid": pod["metadata"]["uid"]}]
        time.sleep(0.5)
        assert cluster.store.list("rayjobs", NS), "nothing deleted it: no signal came"
        cluster.store.delete("pods", NS, pod["metadata"]["name"])
        cluster.wait_for(lambda: not cluster.store.list("rayjobs", NS), "the garbage collector to delete the RayJob")
        assert [r.status for r in cluster.sim.runs.values()] == ["STOPPED"], "KubeRay's finalizer stopped the job"
    finally:
        hold.set()


@pytest.mark.process
def test_sigterm_with_leave_keeps_the_rayjob_and_the_retried_step_adopts_it(cluster):
    run_id = "7e57ab1e-0000-4000-8000-00000000c0de"
    hold = threading.Event()
    cluster.plan[1] = Scripted(hold=hold, lines=("step 10",))
    overrides = ["storage.root=s3://bucket/loomcfm", f"kube.namespace={NS}", "kube.poll_s=0.1",
                 "kube.on_terminate=leave"]
    step = textwrap.dedent(f"""
        import logging
        from loomcfm_core import layout, stages
        from loomcfm_core.config import load_config, load_config_text
        logging.basicConfig(level=logging.INFO)
        cfg = load_config("digits", {overrides!r})
        stages.train(cfg, "s3://bucket/loomcfm/datasets/digits-x", launcher="rayjob", kfp_run_id={run_id!r},
                            kfp_task="train")
    """)
    proc = subprocess.Popen([sys.executable, "-c", step], env=_env(cluster), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out = _terminate_when_running(cluster, proc)
        assert "left it running (kube.on_terminate=leave): a retried step of the same run adopts it" in out
        (left,) = cluster.store.list("rayjobs", NS, f"loomcfm.io/kfp-run-id={run_id}")
        assert left["status"]["jobDeploymentStatus"] == "Running" and not left["metadata"].get("deletionTimestamp")
        cfg = load_config("digits", overrides)
        identity = RunIdentity(layout.run_uri(cfg, "s3://bucket/loomcfm/datasets/digits-x"), run_id, "train")
        threading.Timer(1.0, hold.set).start()
        status = _launch(cfg, _body(cfg, identity))  # the retried step
    finally:
        hold.set()
    assert status["jobStatus"] == "SUCCEEDED" and cluster.store.created["rayjobs"] == 1
    assert left["metadata"]["name"] == identity.name()
