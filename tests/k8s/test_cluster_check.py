"""``loomcfm cluster check`` against the API double with RBAC (tests/k8s/apiserver.py, rbac.py), the simulated
KubeRay v1.7.0 cluster (tests/k8s/kuberay_sim.py and what it drives) and a platform set up as the README says
(tests/k8s/platform.py); the probe pod runs ``loomcfm cluster check --inside`` as a real process against the
real moto S3 and MLflow servers. Each broken piece a new team meets is a ✗ with its fix, and the exit code is 1."""

from __future__ import annotations

import contextlib
import copy
import re
import threading
import time

import pytest

from loomcfm_core.cli import main
from loomcfm_core.kube.platform import OWNER_UID
from tests.k8s.apiserver import ApiServer
from tests.k8s.kuberay_sim import KubeRaySimulator, Scripted
from tests.k8s.platform import RUNNER, crds, install, token

NS = "loomcfm"
IMAGE = "registry.example/ml/loomcfm:1.0"


@contextlib.contextmanager
def platform(tmp_path, monkeypatch, as_runner: bool = False, **setup):
    """The API double with KubeRay, the platform (``setup`` leaves pieces out), and a kubeconfig: the admin's,
    or (``as_runner``) the token of KFP's pipeline-runner, which the Role and ClusterRole of k8s/base bind."""
    sim_args = {k: setup.pop(k) for k in ("nodes", "missing_images", "attempt") if k in setup}
    with ApiServer() as server, KubeRaySimulator(server.store, **sim_args) as sim:
        install(server.store, NS, **setup)
        who = token(server.store, *RUNNER) if as_runner else None
        monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig", NS, who)))
        for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KFP_POD_NAME"):
            monkeypatch.delenv(var, raising=False)
        yield server.store, sim
        assert not sim.errors, sim.errors


def _check(capsys, *args: str, overrides=()) -> tuple[int, str]:
    argv = ["cluster", "check", "--config", "digits", "--set", f"kube.namespace={NS}", "--set", f"kube.image={IMAGE}",
            *[x for o in overrides for x in ("--set", o)], *args]
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def _row(text: str, name: str) -> str:
    match = re.search(rf"^([✓✗]) {re.escape(name)}\s+(.*)$(\n\s+fix: (.*))?", text, re.M)
    assert match, f"no row {name!r} in:\n{text}"
    return match.group(0)


@pytest.mark.process
def test_a_ready_cluster_passes_every_check_with_the_probe_pod(tmp_path, monkeypatch, capsys, s3_bucket,
                                                               mlflow_server, moto_server):
    with platform(tmp_path, monkeypatch, env={"AWS_ENDPOINT_URL": moto_server}):
        code, text = _check(capsys, overrides=[f"storage.root=s3://{s3_bucket}/loomcfm",
                                               f"tracking.uri={mlflow_server.url}", "kube.worker_memory=1Gi"])
    assert code == 0, text
    assert "✗" not in text
    for name in ("CRD rayjobs.ray.io", "CRD rayclusters.ray.io", "KubeRay operator", f"namespace {NS}",
                 "launcher permissions", f"Secret {NS}/loomcfm-s3", f"Secret {NS}/loomcfm-mlflow",
                 f"ConfigMap {NS}/loomcfm-env", f"ConfigMap {NS}/loomcfm-config", "nodes", "RayJobs nobody watches",
                 "Secret kubeflow/loomcfm-s3", "ConfigMap kubeflow/loomcfm-env", "probe pod", "MLflow", "storage",
                 "/dev/shm"):
        assert _row(text, name).startswith("✓"), name
    assert re.search(r"✓ probe pod\s+registry.example/ml/loomcfm:1.0 pulled and started on node-\d", text)
    assert re.search(r"✓ /dev/shm\s+\d+ MiB \(at least 1Gi\)", text), "sized as KubeRay sizes a worker's"
    assert re.search(r"✓ nodes\s+2 pods \(.*\) fit on node-", text)


def _old_crds() -> list[dict]:
    """KubeRay's CRDs before deletionRules (KubeRay < 1.5): the RayJob schema without the field."""
    out = copy.deepcopy(crds())
    for crd in out:
        if crd["metadata"]["name"] == "rayjobs.ray.io":
            v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            strategy = v1["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["deletionStrategy"]
            strategy["properties"].pop("deletionRules")
            strategy.pop("x-kubernetes-validations", None)
    return out


@pytest.mark.parametrize("setup, overrides, name, expected, fix", [
    ({"crd_list": _old_crds()}, ["kube.keep_cluster=true"], "CRD rayjobs.ray.io",
     r"too old for the RayJob: no spec\.deletionStrategy\.deletionRules", r"kubectl apply --server-side -k"),
    ({"crd_list": []}, [], "CRD rayjobs.ray.io", "not installed", "helm does not upgrade them"),
    ({"operator": False}, [], "KubeRay operator", "no Deployment kuberay-system/kuberay-operator",
     "helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0"),
    ({"secrets": False}, [], f"Secret {NS}/loomcfm-s3", "not found",
     f"kubectl -n {NS} create secret generic loomcfm-s3 --from-literal=AWS_ACCESS_KEY_ID=... "
     "--from-literal=AWS_SECRET_ACCESS_KEY=..."),
    ({"kfp_secrets": False}, [], "Secret kubeflow/loomcfm-mlflow", "not found",
     "kubectl -n kubeflow create secret generic loomcfm-mlflow"),
    ({}, ["kube.gpus_per_worker=1"], "nodes",
     r"no node can hold the worker \(workers\) \(cpu 4, memory 8Gi, nvidia.com/gpu 1\) pod: 0/3 nodes: 3 node\(s\) "
     r"lack the label nvidia.com/gpu.present=true", "kube.gpus_per_worker"),
    ({}, ["kube.ray_workers=12"], "nodes", r"each pod fits a node, but not all 13 at once", "kube.ray_workers"),
])
def test_each_broken_piece_is_a_cross_with_its_fix(tmp_path, monkeypatch, capsys, setup, overrides, name, expected,
                                                  fix):
    with platform(tmp_path, monkeypatch, **setup):
        code, text = _check(capsys, "--no-probe", overrides=overrides)
    assert code == 1, text
    row = _row(text, name)
    assert row.startswith("✗") and re.search(expected, row) and re.search(fix, row), row
    assert re.search(r"loomcfm: error: cluster check: \d+ of \d+ checks failed: .*" + re.escape(name), text)


def test_the_pipelines_identity_gets_what_the_check_and_launcher_need_and_no_more(tmp_path, monkeypatch, capsys):
    """As KFP's pipeline-runner (bound by k8s/base's Role and ClusterRole) every check of the RayJob's namespace
    and the cluster passes (KFP's own namespace is read by a step from its environment, or by a person's
    kubeconfig); a namespace whose RoleBinding is missing shows each refused request by its
    SelfSubjectAccessReview."""
    with platform(tmp_path, monkeypatch, as_runner=True) as (store, _):
        code, text = _check(capsys, "--no-probe")
        assert [line for line in text.splitlines() if line.startswith("✗")] == [
            _row(text, name).splitlines()[0] for name in ("ConfigMap kubeflow/loomcfm-env",
                                                          "Secret kubeflow/loomcfm-mlflow", "Secret kubeflow/loomcfm-s3")]
        assert all('in the namespace \"kubeflow\"' in message or 'in the namespace "kubeflow"' in message
                   for message in store.denied), store.denied
        store.delete("rolebindings", NS, "loomcfm-rayjob-launcher")
        code, text = _check(capsys, "--no-probe")
    assert code == 1
    row = _row(text, "launcher permissions")
    assert "this identity may not: create rayjobs.ray.io (start the training); get rayjobs.ray.io" in row
    assert "get pods/log (copy the driver's log)" in row and "list events" in row
    assert re.search(r"✗ Secret loomcfm/loomcfm-s3\s+cannot read: 403 Forbidden: secrets \"loomcfm-s3\" is forbidden: "
                     r"User \"system:serviceaccount:kubeflow:pipeline-runner\" cannot get resource \"secrets\" in API "
                     r"group \"\" in the namespace \"loomcfm\"", text), text


@pytest.mark.process
def test_the_probe_pod_reports_an_image_that_does_not_pull_and_a_small_shm(tmp_path, monkeypatch, capsys, s3_bucket,
                                                                          mlflow_server, moto_server):
    with platform(tmp_path, monkeypatch, missing_images={IMAGE}):
        code, text = _check(capsys)
    assert code == 1
    assert re.search(r"✗ probe pod\s+registry.example/ml/loomcfm:1.0: (ErrImagePull|ImagePullBackOff): .*rpc error: .*"
                     r"not found\n\s+fix: kubectl -n loomcfm describe pod loomcfm-check-\w+", text), text
    with platform(tmp_path, monkeypatch, env={"AWS_ENDPOINT_URL": moto_server}) as (store, _):
        code, text = _check(capsys, overrides=[f"storage.root=s3://{s3_bucket}/loomcfm",
                                               f"tracking.uri={mlflow_server.url}", "kube.worker_memory=4Ti"])
        assert not store.list("pods", NS, "app.kubernetes.io/component=cluster-check"), "the probe pod is deleted"
    assert code == 1
    assert re.search(r"✗ /dev/shm\s+\d+ MiB, expected at least 4Ti\n\s+fix: mount an emptyDir \{medium: Memory, "
                     r"sizeLimit: 4Ti\} at /dev/shm", text), text


def test_a_rayjob_whose_step_pod_is_gone_is_reaped_unless_a_retry_adopted_it_or_it_was_left(tmp_path, monkeypatch,
                                                                                             capsys):
    """The reaper (part of the check) deletes a running RayJob whose KFP step pod (in KFP's namespace: no owner
    reference can cross namespaces) is gone; a retried step that adopted the RayJob named its own pod, and a
    ``kube.on_terminate=leave`` RayJob is left on purpose."""
    from loomcfm_core.config import load_config
    from loomcfm_core.errors import RayJobError
    from loomcfm_core.kube.client import connect
    from loomcfm_core.kube.launcher import run_rayjob
    from loomcfm_core.kube.rayjob import RunIdentity, build_rayjob, load_template

    hold = threading.Event()

    def pod(store, name):
        return store.create("pods", "kubeflow", {"metadata": {"name": name}, "spec": {"containers": [
            {"name": "main", "image": IMAGE, "command": ["sleep", "600"]}]}})[0]["metadata"]["uid"]

    def rayjob(store, owner, *overrides, task="train"):
        cfg = load_config("digits", ["storage.root=s3://b/x", f"kube.namespace={NS}", "kube.poll_s=0.05", *overrides])
        body = build_rayjob(load_template(), cfg, RunIdentity("s3://b/x/runs/r", "run-1", task), [],
                            owner=("kubeflow", owner, pod(store, owner)))
        assert "ownerReferences" not in body["metadata"], "no owner across namespaces: the GC would delete it"
        return cfg, body

    with platform(tmp_path, monkeypatch, attempt=lambda job, n: Scripted(hold=hold)) as (store, sim):
        try:
            cfg, first = rayjob(store, "run-train-try-1")
            store.create("rayjobs", NS, first)
            cfg, retry = rayjob(store, "run-train-try-2")  # the same task's retry: the same RayJob
            watching = threading.Thread(target=lambda: pytest.raises(RayJobError, run_rayjob, connect(NS), retry,
                                                                     cfg.kube, patience_s=2.0), daemon=True)
            watching.start()
            name = first["metadata"]["name"]
            deadline = time.monotonic() + 60
            while store.get("rayjobs", NS, name)["metadata"]["annotations"][OWNER_UID] != \
                    retry["metadata"]["annotations"][OWNER_UID]:
                assert time.monotonic() < deadline, "the adopting step names itself the watcher"
                time.sleep(0.05)
            _, left = rayjob(store, "run-other-1", "kube.on_terminate=leave", task="other")
            store.create("rayjobs", NS, left)
            store.delete("pods", "kubeflow", "run-train-try-1")
            store.delete("pods", "kubeflow", "run-other-1")
            _, text = _check(capsys, "--no-probe")
            assert re.search(r"✓ RayJobs nobody watches\s+none", text), text
            assert len(store.list("rayjobs", NS)) == 2
            store.delete("pods", "kubeflow", "run-train-try-2")  # the retried step's pod goes too
            _, text = _check(capsys, "--no-probe")
            watching.join(timeout=60)
        finally:
            hold.set()
    assert re.search(rf"✓ RayJobs nobody watches\s+deleted RayJob loomcfm/{name}: its step pod "
                     r"kubeflow/run-train-try-2 is gone\n", text), text


def test_in_kfp_local_with_the_local_launcher_there_is_nothing_to_check(tmp_path, monkeypatch, capsys):
    from loomcfm_core import stages
    from loomcfm_core.config import load_config

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    stages.check_cluster(load_config("digits"), "local", step=True)
    assert "nothing to check" in capsys.readouterr().out


def test_as_a_pipeline_step_it_checks_what_its_pod_was_given(tmp_path, monkeypatch, capsys, s3_bucket, mlflow_server):
    """The first step of a pipeline (a KFP pod: KFP_POD_NAME), as its ServiceAccount: the API checks, then what
    the Secrets of KFP's namespace put into its environment (optional in the packages, so a missing one would
    surface only later), and MLflow and storage from its own pod. No probe pod, no /dev/shm of its own."""
    from loomcfm_core import stages
    from loomcfm_core.config import load_config
    from loomcfm_core.errors import ClusterCheckError

    with platform(tmp_path, monkeypatch, as_runner=True):
        monkeypatch.setenv("KFP_POD_NAME", "loomcfm-abc-system-container-impl-1")
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.delenv(var, raising=False)
        cfg = load_config("digits", [f"storage.root=s3://{s3_bucket}/loomcfm", f"tracking.uri={mlflow_server.url}",
                                     f"kube.namespace={NS}", f"kube.image={IMAGE}"])
        with pytest.raises(ClusterCheckError, match=r"1 of \d+ checks failed: step env from Secret loomcfm-mlflow$"):
            stages.check_cluster(cfg, "rayjob", step=True)
    text = capsys.readouterr().out
    for name in ("launcher permissions", "nodes", "step env from Secret loomcfm-s3", "shared storage and tracking",
                 "MLflow", "storage"):
        assert _row(text, name).startswith("✓"), name
    assert re.search(r"✗ step env from Secret loomcfm-mlflow\s+this step has no MLFLOW_TRACKING_PASSWORD, "
                     r"MLFLOW_TRACKING_USERNAME\n\s+fix: create Secret loomcfm-mlflow with", text), text
    assert "probe pod" not in text and "/dev/shm" not in text and "kubeflow/" not in text
