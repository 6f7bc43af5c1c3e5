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
