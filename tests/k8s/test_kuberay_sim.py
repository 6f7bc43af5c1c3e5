"""The test doubles themselves: the API server (tests/k8s/apiserver.py) and KubeRay's validation and controller
(tests/k8s/kuberay_rules.py, tests/k8s/kuberay_sim.py) reject what the real ones reject, with their messages,
and keep their bookkeeping (finalizers, resourceVersion, owners, selectors)."""

from __future__ import annotations

import copy
import json
import threading
import time

import pytest

from tests.k8s.apiserver import ApiError, ApiServer, Store, admit, selector_matches
from tests.k8s.kuberay_rules import validate_rayjob
from tests.k8s.kuberay_sim import FINALIZER, KubeRaySimulator, Scripted
from tests.k8s.platform import install
from tests.k8s.rayjobs import rayjob, rule, with_spec

SPEC = "The RayJob spec is invalid: "


@pytest.fixture(scope="module")
def valid() -> dict:
    return rayjob()


def test_kuberays_validation_rules_and_messages(valid):
    no_shutdown = {"shutdownAfterJobFinishes": None, "ttlSecondsAfterFinished": None}
    cases = [
        (with_spec(valid, shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=60),
         SPEC + "a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"),
        (with_spec(valid, suspend=True, shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=None),
         SPEC + "a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended"),
        (with_spec(valid, deletionStrategy={"deletionRules": [rule("DeleteCluster", jobStatus="FAILED")]}),
         SPEC + "spec.shutdownAfterJobFinishes and spec.deletionStrategy.deletionRules are mutually exclusive"),
        (with_spec(valid, **no_shutdown, deletionStrategy={"deletionRules": [
            rule("DeleteCluster", 0, jobStatus="FAILED"), rule("DeleteWorkers", 60, jobStatus="FAILED"),
            rule("DeleteCluster", 5, jobStatus="FAILED")]}),
         "deletionRules[2]: duplicate rule for DeletionPolicyType 'DeleteCluster' and JobStatus 'FAILED'\n"
         "for JobStatus 'FAILED': DeleteCluster TTL (0) must be >= DeleteWorkers TTL (60)"),
        (with_spec(valid, **no_shutdown, deletionStrategy={"onSuccess": {"policy": "DeleteCluster"}}),
         "both DeletionStrategy.OnSuccess and DeletionStrategy.OnFailure must be set when using the legacy deletion "
         "policy fields of DeletionStrategy"),
        (with_spec(valid, deletionStrategy={"onSuccess": {"policy": "DeleteNone"}, "onFailure": {"policy": "DeleteNone"}}),
         SPEC + "shutdownAfterJobFinshes is set to 'true' while deletion policy is 'DeleteNone'"),
        (with_spec(valid, activeDeadlineSeconds=0), SPEC + "activeDeadlineSeconds must be a positive integer"),
        (with_spec(valid, backoffLimit=-1), SPEC + "backoffLimit must be a positive integer"),
        (with_spec(valid, rayClusterSpec=None), SPEC + "one of RayClusterSpec or ClusterSelector must be set"),
    ]
    for body, message in cases:
        assert validate_rayjob(body) == message
    gated = with_spec(valid, **no_shutdown, deletionStrategy={"deletionRules": [rule("DeleteCluster", jobStatus="FAILED")]})
    assert validate_rayjob(gated) is None
    gate_off = validate_rayjob(gated, gate=False)
    assert gate_off == "RayJobDeletionPolicy feature gate must be enabled to use DeletionStrategy"
    workers = copy.deepcopy(valid)
    workers["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=3, maxReplicas=2)
    assert validate_rayjob(workers) == SPEC + "worker group workers has minReplicas 3 greater than maxReplicas 2"
    both = copy.deepcopy(valid)
    both["spec"]["rayClusterSpec"]["headGroupSpec"]["resources"] = {"CPU": "1"}
    assert validate_rayjob(both).startswith(SPEC + "resource fields should not be set in both rayStartParams and "
                                            "Resources for Head group")
    for name, message in (("a" * 48, "RayJob name should be no more than 47 characters"),
                          ("0-starts-with-a-digit", "RayJob name should be a valid DNS1035 label: [a DNS-1035")):
        renamed = copy.deepcopy(valid)
        renamed["metadata"]["name"] = name
        assert validate_rayjob(renamed).startswith(f"The RayJob metadata is invalid: {message}")
    waiting = {**valid, "status": {"jobDeploymentStatus": "Waiting"}}  # ValidateRayJobStatus
    assert validate_rayjob(waiting) == ("The RayJob status is invalid: JobDeploymentStatus cannot be `Waiting` when "
                                        "SubmissionMode is not InteractiveMode")


def test_the_api_server_enforces_the_crd_schema_and_its_cel_rules(valid):
    body = copy.deepcopy(valid)
    body["spec"]["bogus"] = 1
    warnings = admit("RayJob", body, strict=False)
    assert "bogus" not in body["spec"] and warnings == ['299 - "unknown field \\"spec.bogus\\""']
    assert body["spec"]["submissionMode"] == "K8sJobMode" and body["spec"]["rayClusterSpec"]["headGroupSpec"]
    with pytest.raises(ApiError) as info:
        admit("RayJob", with_spec(valid, bogus=1), strict=True)
    assert info.value.code == 400 and 'unknown field "spec.bogus"' in info.value.message
    rejected = {
        "preRunningDeadlineSeconds": with_spec(valid, preRunningDeadlineSeconds=0),
        "cannot be used together within the same deletionStrategy": with_spec(valid, deletionStrategy={
            "onSuccess": {"policy": "DeleteCluster"}, "onFailure": {"policy": "DeleteCluster"},
            "deletionRules": [rule("DeleteCluster", jobStatus="FAILED")]}),
        "requires either BOTH onSuccess and onFailure": with_spec(valid, deletionStrategy={}),
        "JobStatus and JobDeploymentStatus cannot be used together": with_spec(valid, deletionStrategy={"deletionRules": [
            rule("DeleteCluster", jobStatus="FAILED", jobDeploymentStatus="Failed")]}),
        "deletionRules": with_spec(valid, deletionStrategy={"deletionRules": []}),
        "'Running' is not one of ['Failed']": with_spec(valid, deletionStrategy={"deletionRules": [
            rule("DeleteCluster", jobDeploymentStatus="Running")]}),
        "managedBy": with_spec(valid, managedBy="someone-else"),
    }
    for expected, body in rejected.items():
        with pytest.raises(ApiError) as info:
            admit("RayJob", body, strict=True)
        assert info.value.code == 422 and info.value.reason == "Invalid" and expected in info.value.message, \
            (expected, info.value.message)
        assert info.value.body()["details"]["causes"]


def test_store_bookkeeping_finalizers_conflicts_owners_and_selectors():
    store = Store()
    owner, _ = store.create("jobs", "ns", {"apiVersion": "batch/v1", "kind": "Job", "metadata": {
        "name": "j", "finalizers": ["x/y"], "labels": {"a": "1", "b": "2"}}, "spec": {}, "status": {"x": 1}})
    assert "status" not in owner and owner["metadata"]["generation"] == 1
    ref = {"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": owner["metadata"]["uid"], "controller": True}
    store.create("pods", "ns", {"metadata": {"name": "p", "ownerReferences": [ref]}, "spec": {"containers": []}})
    with pytest.raises(ApiError) as info:
        store.create("jobs", "ns", {"metadata": {"name": "j"}, "spec": {}})
    assert info.value.body()["reason"] == "AlreadyExists" and info.value.message == 'jobs.batch "j" already exists'
    stale = copy.deepcopy(owner)
    store.update("jobs", "ns", {**owner, "spec": {"parallelism": 1}})
    with pytest.raises(ApiError) as info:
        store.update("jobs", "ns", stale)
    assert info.value.reason == "Conflict"
    terminating = store.delete("jobs", "ns", "j")
    assert terminating["metadata"]["deletionTimestamp"] and store.get("jobs", "ns", "j")
    current = store.get("jobs", "ns", "j")
    current["metadata"]["finalizers"] = []
    store.update("jobs", "ns", current)
    for resource, name in (("jobs", "j"), ("pods", "p")):
        with pytest.raises(ApiError, match="not found"):
            store.get(resource, "ns", name)
    labels = {"app": "x", "tier": "db"}
    assert selector_matches("app=x,tier in (db, cache),!missing", labels)
    assert not selector_matches("app!=x", labels) and not selector_matches("tier notin (db)", labels)
    with pytest.raises(ApiError):
        selector_matches("app=x,=", labels)


def test_the_controller_adds_and_honours_its_finalizer_and_deletes_itself_byrule(valid):
    hold_forever = Scripted(hold=threading.Event())
    with ApiServer() as server, KubeRaySimulator(server.store, attempt=lambda job, n: hold_forever) as sim:
        store = server.store
        install(store)
        store.create("rayjobs", "loomcfm", valid)
        name = valid["metadata"]["name"]
        deadline = time.monotonic() + 30
        while store.get("rayjobs", "loomcfm", name).get("status", {}).get("jobStatus") != "RUNNING":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert FINALIZER in store.get("rayjobs", "loomcfm", name)["metadata"]["finalizers"]
        assert json.dumps(store.list("pods", "loomcfm", f"job-name={name}"))
        store.delete("rayjobs", "loomcfm", name)
        while store.list("rayjobs", "loomcfm"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [r.status for r in sim.runs.values()] == ["STOPPED"] and not store.list("rayclusters", "loomcfm")
        # DeleteSelf once succeeded: the RayJob removes itself
        selfish = with_spec(valid, shutdownAfterJobFinishes=None, ttlSecondsAfterFinished=None,
                        deletionStrategy={"deletionRules": [rule("DeleteSelf", jobStatus="SUCCEEDED")]})
        sim.attempt = lambda job, n: Scripted()
        store.create("rayjobs", "loomcfm", selfish)
        while store.created["rayjobs"] < 2 or store.list("rayjobs", "loomcfm"):
            assert time.monotonic() < deadline + 30
            time.sleep(0.05)
        assert sim.history[name][-1] == "Complete" and not sim.errors


def test_rbac_follows_kubernetes_rules_and_answers_with_its_403():
    """plugin/pkg/auth/authorizer/rbac/rbac.go RuleAllows, evaluation_helpers.go, rule.go VisitRulesFor, and the
    apiserver's forbiddenMessage / NewForbidden (kubernetes/apiserver and apimachinery v0.34.10)."""
    from tests.k8s.rbac import Request, forbidden, service_account

    store = Store()
    store.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "r",
                 "namespace": "ns"}, "rules": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["*/status"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["s"], "verbs": ["get", "list"]},
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["*"]}]})
    store.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "rb",
                 "namespace": "ns"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
                 "subjects": [{"kind": "ServiceAccount", "name": "sa", "namespace": "other"}]})
    user = service_account("other", "sa")
    allowed = lambda verb, group, resource, sub="", ns="ns", name="": store.authorize(  # noqa: E731
        user, Request(verb, group, resource, sub, ns, name))[0]
    assert allowed("get", "", "pods") and allowed("list", "", "pods") and allowed("delete", "ray.io", "rayjobs")
    assert not allowed("get", "", "pods", "log"), "pods does not grant pods/log"
    assert allowed("get", "", "pods", "status"), "*/status grants every status subresource"
    assert allowed("get", "", "secrets", name="s") and not allowed("get", "", "secrets", name="t")
    assert not allowed("list", "", "secrets"), "a resourceNames rule never grants a list without a name"
    assert not allowed("get", "", "pods", ns="elsewhere") and not allowed("get", "", "pods", ns="")
    assert not allowed("delete", "", "rayjobs"), "the API group is part of the rule"
    assert store.authorize(user, Request("create", "authorization.k8s.io", "selfsubjectaccessreviews"))[0]
    assert store.authorize(user, Request("get", "", "pods", "", "ns"))[1] == \
        'RBAC: allowed by RoleBinding "rb/ns" of Role "r" to ServiceAccount "sa/other"'
    req = Request("get", "", "pods", "log", "ns", "p")
    message, details = forbidden(user, req, store.authorize(user, req)[1])
    assert message == ('pods "p" is forbidden: User "system:serviceaccount:other:sa" cannot get resource "pods/log" in '
                       'API group "" in the namespace "ns"') and details == {"name": "p", "kind": "pods"}
    req = Request("list", "", "nodes")
    assert forbidden(user, req, "")[0] == ('nodes is forbidden: User "system:serviceaccount:other:sa" cannot list '
                                           'resource "nodes" in API group "" at the cluster scope')
    store.delete("roles", "ns", "r")
    assert store.authorize(user, Request("get", "", "pods", "", "ns")) == \
        (False, 'RBAC: role.rbac.authorization.k8s.io "r" not found')


def test_the_scheduler_counts_each_nodes_first_refusal_in_its_message():
    """pkg/scheduler/framework/types.go (*FitError).Error with DefaultPreemption's part: a tainted control plane
    (unresolvable) and two nodes full of other pods (resolvable by preemption, but no victims)."""
    from tests.k8s.scheduler_sim import node, schedule

    store = Store()
    store.apply(node("cp", cpu="8", taints=[{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]))
    for name in ("a", "b"):
        store.apply(node(name, cpu="4"))
        store.create("pods", "ns", {"metadata": {"name": f"busy-{name}"}, "spec": {"nodeName": name, "containers": [
            {"name": "c", "resources": {"requests": {"cpu": "3"}}}]}})
    store.create("pods", "ns", {"metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "c", "resources": {"limits": {"cpu": "2", "memory": "1Gi"}}}]}})
    schedule(store)
    pod = store.get("pods", "ns", "p")
    (condition,) = [c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled"]
    assert (condition["status"], condition["reason"]) == ("False", "Unschedulable")
    assert condition["message"] == (
        "0/3 nodes are available: 1 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }, 2 "
        "Insufficient cpu. preemption: 0/3 nodes are available: 1 Preemption is not helpful for scheduling, 2 No "
        "preemption victims found for incoming pod.")
    (event,) = store.list("events", "ns", fields="reason=FailedScheduling")
    assert (event["type"], event["source"]["component"], event["message"]) == \
        ("Warning", "default-scheduler", condition["message"])


def test_kuberays_pods_run_the_commands_pod_go_writes(valid):
    """common/pod.go BuildPod for our RayJob's cluster: the head and worker commands word for word (flags sorted,
    double spaces, trailing space; research-issue20.md §1b), the worker's wait-gcs-ready, KubeRay's env and the
    HTTP probes of rayVersion >= 2.53."""
    from tests.k8s.raycluster_sim import build_pod, head_service

    cluster = {"metadata": {"name": "C", "namespace": "loomcfm", "uid": "u", "labels": {}},
               "spec": copy.deepcopy(valid["spec"]["rayClusterSpec"])}
    cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"] = {
        "limits": {"cpu": "4", "memory": "8Gi"}, "requests": {"cpu": "4", "memory": "8Gi"}}
    head = build_pod(cluster, cluster["spec"]["headGroupSpec"], "head")["spec"]
    worker = build_pod(cluster, cluster["spec"]["workerGroupSpecs"][0], "worker")["spec"]
    assert head["containers"][0]["args"] == ["ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536}; ray start --head  --block"
                                             "  --dashboard-agent-listen-port=52365  --dashboard-host=0.0.0.0  "
                                             "--memory=4294967296  --metrics-export-port=8080  --num-cpus=0 "]
    assert worker["containers"][0]["args"] == ["ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536}; ray start  --address="
                                               "C-head-svc.loomcfm.svc.cluster.local:6379  --block  --dashboard-agent-"
                                               "listen-port=52365  --memory=8589934592  --metrics-export-port=8080  "
                                               "--num-cpus=4 "]
    assert worker["containers"][0]["command"] == ["/bin/bash", "-c", "--"]
    (init,) = worker["initContainers"]
    assert init["name"] == "wait-gcs-ready" and "ray health-check --address C-head-svc.loomcfm.svc.cluster.local:6379" \
        in init["args"][0] and init["resources"]["limits"] == {"cpu": "200m", "memory": "256Mi"}
    env = {e["name"]: e.get("value") for e in worker["containers"][0]["env"]}
    assert env["RAY_ADDRESS"] == "C-head-svc.loomcfm.svc.cluster.local:6379" and env["FQ_RAY_IP"] == \
        "C-head-svc.loomcfm.svc.cluster.local"
    assert {e["name"]: e.get("value") for e in head["containers"][0]["env"]}["RAY_ADDRESS"] == "127.0.0.1:6379"
    assert head["containers"][0]["readinessProbe"]["httpGet"] == {"path": "/api/healthz", "port": 52365}
    assert {"name": "shared-mem", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in worker["volumes"]
    assert [p["name"] for p in head_service(cluster)["spec"]["ports"]] == ["client", "dashboard", "gcs-server",
                                                                          "metrics"]
