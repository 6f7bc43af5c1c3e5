"""A first run that cannot start says why within ``kube.fail_fast_s``, not after 3 x preRunningDeadlineSeconds:
the launcher (loomcfm_core/kube/pods.py) reads the pods the simulated KubeRay v1.7.0 RayCluster controller,
scheduler and kubelet make (tests/k8s/raycluster_sim.py, scheduler_sim.py, kubelet_sim.py) and their events,
through the real ``kubernetes`` client, as the pipeline's ServiceAccount with the Role of k8s/base/rbac.yaml
(the API double enforces it).

Each case is what a new team meets: an image that does not pull, a Secret or a key missing in the namespace,
a container that crash-loops, no node with the requested GPUs (waits, and says so), and the operator's
dashboard checks failing (JobStatusCheckTimeoutExceeded, named with its usual cause)."""

from __future__ import annotations

import contextlib
import re
import threading
import time

import pytest

from loomcfm_core.config import load_config
from loomcfm_core.errors import RayJobError
from loomcfm_core.kube.client import connect
from loomcfm_core.kube.launcher import run_rayjob
from loomcfm_core.kube.rayjob import RunIdentity, build_rayjob, load_template
from tests.k8s.apiserver import ApiServer
from tests.k8s.kuberay_sim import Image, KubeRaySimulator, Scripted
from tests.k8s.platform import RUNNER, example_secret, install, token

NS = "loomcfm"
FAST = {"patience_s": 5.0, "retry_base_s": 0.05, "teardown_s": 1.0, "margin_s": 2.0, "gone_wait_s": 10.0,
        "progress_s": 0.3}
IMAGE = "registry.example/ml/loomcfm:1.0"


@contextlib.contextmanager
def simulated(tmp_path, monkeypatch, secrets: bool = True, **sim):
    """A platform as set up by the README (or without its Secrets), KubeRay on top, and a kubeconfig holding
    the token of KFP's pipeline-runner ServiceAccount (bound to our Role)."""
    with ApiServer() as server, KubeRaySimulator(server.store, **sim) as simulator:
        install(server.store, NS, secrets=secrets)
        monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig", NS,
                                                                token(server.store, *RUNNER))))
        for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
            monkeypatch.delenv(var, raising=False)
        yield server.store, simulator
        assert not simulator.errors, simulator.errors
        assert not server.store.denied, "the Role grants what the launcher does"


def _cfg(*overrides: str):
    return load_config("digits", ["storage.root=s3://bucket/loomcfm", f"kube.namespace={NS}", "kube.poll_s=0.05",
                                  f"kube.image={IMAGE}", "kube.fail_fast_s=1", *overrides])


def _launch(cfg) -> dict:
    body = build_rayjob(load_template(), cfg, RunIdentity("s3://bucket/loomcfm/runs/digits-0123"),
                        ["--dataset", "s3://bucket/loomcfm/datasets/digits-x"])
    return run_rayjob(connect(NS), body, cfg.kube, **FAST)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def test_an_image_that_does_not_pull_ends_the_step_naming_pod_cause_and_command(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO")
    with simulated(tmp_path, monkeypatch, missing_images={IMAGE}) as (store, _):
        with pytest.raises(RayJobError) as info:
            _launch(_cfg())
        text = _one_line(info)
        assert re.search(r"RayJob loomcfm/loomcfm-train-\w+ cannot start: (head|worker) pod \S+ container "
                         r"(ray-head|ray-worker|wait-gcs-ready): (ErrImagePull|ImagePullBackOff): ", text), text
        assert f'failed to resolve reference "{IMAGE}"' in text and "(for 1 s, kube.fail_fast_s)" in text
        assert re.search(r"see: kubectl -n loomcfm describe pod \S+; deleted it$", text), text
        deadline = time.monotonic() + 30
        while store.list("rayjobs", NS):  # KubeRay's finalizer goes first
            assert time.monotonic() < deadline, "kube.on_terminate=delete: the RayJob goes"
            time.sleep(0.05)
    assert "failing in" in caplog.text and "unless it clears (kube.fail_fast_s)" in caplog.text


@pytest.mark.parametrize("missing, expected", [
    ("secret", 'CreateContainerConfigError: secret "loomcfm-s3" not found'),
    ("key", "CreateContainerConfigError: couldn't find key AWS_SECRET_ACCESS_KEY in Secret loomcfm/loomcfm-s3")])
def test_a_missing_secret_or_key_ends_the_step_with_the_kubelets_words(tmp_path, monkeypatch, missing, expected):
    with simulated(tmp_path, monkeypatch, secrets=False) as (store, _):
        store.apply(example_secret("loomcfm-mlflow", NS))
        if missing == "key":
            store.apply(example_secret("loomcfm-s3", NS, drop=("AWS_SECRET_ACCESS_KEY",)))
        with pytest.raises(RayJobError) as info:
            _launch(_cfg("kube.on_terminate=leave"))
        text = _one_line(info)
        assert expected in text and text.endswith("left it (kube.on_terminate=leave)"), text
        assert store.list("rayjobs", NS), "kube.on_terminate=leave keeps the RayJob"


def test_a_crash_loop_names_the_exit_and_the_previous_log(tmp_path, monkeypatch):
    crashing = Image(exit_code=2, output=("ImportError: libcudart.so.13: cannot open shared object file",))
    with simulated(tmp_path, monkeypatch, images={IMAGE: crashing}, backoff_scale=0.001) as (store, _):
        with pytest.raises(RayJobError) as info:
            _launch(_cfg())
        text = _one_line(info)
        assert re.search(r"pod (\S+) container (\S+): CrashLoopBackOff: exit code 2 \(Error\), restarted \d+ times; "
                         r"back-off [\dms]+ restarting failed container=\2 pod=\1_loomcfm\(", text), text
        pod, container = re.search(r"pod (\S+) container (\S+): CrashLoopBackOff", text).groups()
        assert f"see: kubectl -n loomcfm logs {pod} -c {container} --previous" in text


def test_unschedulable_waits_and_says_so_with_the_schedulers_message(tmp_path, monkeypatch, caplog):
    """GPU workers on a cluster of CPU nodes: the step waits (an autoscaler may add a node) until KubeRay's
    preRunningDeadlineSeconds, printing the scheduler's verdict, and fails with KubeRay's reason."""
    caplog.set_level("INFO")
    with simulated(tmp_path, monkeypatch) as (store, _):
        cfg = _cfg("kube.gpus_per_worker=1", "kube.ray_workers=2", "kube.pre_running_deadline_s=2",
                   "kube.backoff_limit=0", 'kube.gpu_node_selector=""')
        with pytest.raises(RayJobError, match=r"PreRunningDeadlineExceeded"):
            _launch(cfg)
    assert re.search(r"head Running, workers 0/2 Ready; \S+-workers-worker-\S+ Pending: Unschedulable: 0/3 nodes are "
                     r"available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 Preemption "
                     r"is not helpful for scheduling.", caplog.text), caplog.text
    assert "a pod cannot be scheduled yet; waiting (a cluster autoscaler may add a node" in caplog.text
    assert "cannot start" not in caplog.text


def test_progress_is_printed_when_it_changes_and_at_most_every_progress_s(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="loomcfm_core.kube.pods")
    hold = threading.Event()
    with simulated(tmp_path, monkeypatch, attempt=lambda job, n: Scripted(hold=hold)):
        threading.Timer(3.0, hold.set).start()
        _launch(_cfg())
    lines = [r for r in caplog.records if r.name == "loomcfm_core.kube.pods"]
    assert lines and all(b.created - a.created >= FAST["progress_s"] - 0.05 for a, b in zip(lines, lines[1:]))
    assert len({r.getMessage() for r in lines}) == len(lines), "a line is printed when the pods changed"


def test_job_status_check_timeout_is_named_with_its_usual_cause(tmp_path, monkeypatch):
    hold = threading.Event()
    with simulated(tmp_path, monkeypatch, attempt=lambda job, n: Scripted(hold=hold),
                   status_check_timeout_s=1) as (store, sim):
        def block_when_running():
            while not any(r.status == "RUNNING" for r in sim.runs.values()):
                hold.wait(0.05)
            sim.dashboards.block(next(iter(sim.runs.values())).host)

        threading.Thread(target=block_when_running, daemon=True).start()
        try:
            with pytest.raises(RayJobError) as info:
                _launch(_cfg())
        finally:
            hold.set()
    text = str(info.value)
    assert "ended Failed after 1 of 3 attempt(s)" in text and "JobStatusCheckTimeoutExceeded" in text, text
    assert re.search(r"Job status checks have been failing since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d; exceeded timeout of 1s",
                     text), text
    assert "a NetworkPolicy or a service mesh" in text and "port 8265" in text
