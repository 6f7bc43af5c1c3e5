"""A RayJob whose pods are real hosts: KubeRay v1.7.0's pods (tests/k8s/raycluster_sim.py) run as network
namespaces of this machine (tests/k8s/hosts.py, tests/netns.py), each with its own address. The head runs
``ray start --head`` with the rendered head parameters (``num-cpus=0``), each worker ``wait-gcs-ready`` and
``ray start --address=<cluster>-head-svc.<ns>.svc.cluster.local:6379`` (the Service's name resolves to the
head), the submitter pod KubeRay's ``ray job submit`` script against the head's real dashboard, and the
entrypoint (``loomcfm train``, no ``RAY_ADDRESS=local``) a real Ray Train job with 2 workers on the 2 worker
hosts. They read the dataset from S3 (moto) and log to MLflow (a real ``mlflow server --app-name basic-auth``)
with the credentials the rendered manifests give them: the Secrets' values, through the kubelet's
``secretKeyRef``s, and the ConfigMap loomcfm-env's endpoint. Both servers listen on the bridge's address only,
as cluster services would. The launcher watches it from "a laptop" (a kubeconfig), as ``loomcfm train
--launcher rayjob`` does.

One cluster of hosts per module; the training is a few steps. Needs root and iproute2 (CI runs as root).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest

from loomcfm_core import layout, stages
from loomcfm_core.config import load_config
from loomcfm_core.checkpoint import list_checkpoints
from loomcfm_core.data.cache import cache_dataset
from loomcfm_core.kube.rayjob import RunIdentity, cluster_config
from tests.conftest import free_port, wait_for_health
from tests.k8s.apiserver import ApiServer
from tests.k8s.hosts import HostRuntime
from tests.k8s.kuberay_sim import KubeRaySimulator
from tests.k8s.platform import install
from tests.netns import Network, require_ip_netns
from tests.training import TINY

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
NS = "loomcfm"
USER, PASSWORD = "loomcfm-admin", "a-long-enough-password-1"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def _server(net: Network, argv: list[str], env: dict, log, root) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", *argv], env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    net.procs.append(proc)
    return proc


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The bridge, moto S3 and MLflow (basic auth) on its address, the API double with KubeRay whose pods are
    hosts, and the platform of the README with the Secrets holding these servers' credentials."""
    require_ip_netns()
    root = tmp_path_factory.mktemp("hosts")
    net = Network().up()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    try:
        s3 = f"http://{net.bridge_ip}:{free_port()}"
        s3_log = root / "moto.log"
        with open(s3_log, "w") as log:
            _server(net, ["moto.server", "-H", net.bridge_ip, "-p", s3.rsplit(":", 1)[1]], base, log, root)
        aws = {**S3_KEYS, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3}
        bucket = f"hosts-{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3", endpoint_url=s3, region_name="us-east-1", aws_access_key_id="testing",
                             aws_secret_access_key="testing").create_bucket(Bucket=bucket)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                assert time.monotonic() < deadline, s3_log.read_text()[-3000:]
                time.sleep(0.3)
        (root / "auth.ini").write_text(f"[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = sqlite:///"
                                       f"{root / 'auth.db'}\nadmin_username = {USER}\nauth_cache_ttl_seconds = 60\n")
        port = free_port()
        mlflow = f"http://{net.bridge_ip}:{port}"
        mlflow_log = root / "mlflow.log"
        env = {**base, **aws, "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_AUTH_ADMIN_USERNAME": USER,
               "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
               "MLFLOW_SERVER_ALLOWED_HOSTS": f"{net.bridge_ip},{net.bridge_ip}:*",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "HOME": str(root)}
        with open(mlflow_log, "w") as log:
            proc = _server(net, ["mlflow", "server", "--app-name=basic-auth", f"--backend-store-uri=sqlite:///"
                                 f"{root / 'mlflow.db'}", f"--artifacts-destination=s3://{bucket}/mlflow",
                                 "--serve-artifacts", f"--host={net.bridge_ip}", f"--port={port}", "--workers=1"],
                           env, log, root)
        wait_for_health(mlflow, proc, timeout=240)
        with ApiServer() as server:
            runtime = HostRuntime(server.store, net, root / "pods")
            with KubeRaySimulator(server.store, runtime=runtime, tick_s=0.2) as sim:
                install(server.store, NS, values={**S3_KEYS, "MLFLOW_TRACKING_USERNAME": USER,
                                                  "MLFLOW_TRACKING_PASSWORD": PASSWORD},
                        env={"AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3})
                yield {"net": net, "server": server, "sim": sim, "runtime": runtime, "s3": s3, "aws": aws,
                       "bucket": bucket, "mlflow": mlflow, "root": root, "logs": (s3_log, mlflow_log)}
                assert not sim.errors, sim.errors
    finally:
        net.down()


def _addresses(log_text: str, path_part: str) -> set[str]:
    """Client addresses of the requests a server logged whose line mentions ``path_part``."""
    return {m.group(1) for line in log_text.splitlines() if path_part in line  # werkzeug's and uvicorn's lines
            for m in [re.search(r"(\d{1,3}(?:\.\d{1,3}){3})(?::\d+)? - ", line)] if m}


def _driver_pids(world) -> list[int]:
    """The entrypoint's processes (``loomcfm train``, started by the job supervisor) on the head host."""
    runtime, net = world["runtime"], world["net"]
    heads = [ns for ns, _, pod in runtime.pods.values() if pod["metadata"]["labels"].get("ray.io/node-type") == "head"]
    found = []
    for ns in heads:
        for pid in net.pids(ns):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "loomcfm train" in cmdline:
                found.append(pid)
    return found


def test_a_rayjob_trains_on_pod_hosts_and_a_killed_attempt_resumes_on_new_ones(world, tmp_path, monkeypatch,
                                                                              caplog):
    """The whole path below the RayJob, then KubeRay's retry: the first attempt's driver is killed after its
    first checkpoint; the retry runs on a new RayCluster (new hosts), its entrypoint waits for the dead driver's
    lease on the run folder to expire (``--wait``) and resumes from the checkpoint in S3."""
    caplog.set_level("INFO")
    for key, value in world["aws"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("KUBECONFIG", str(world["server"].kubeconfig(tmp_path / "kubeconfig", NS)))
    cfg = load_config("digits", [*TINY, "train.max_steps=10", "train.checkpoint_every=5", "train.lease_seconds=5",
                                 f"storage.root=s3://{world['bucket']}/root", f"tracking.uri={world['mlflow']}",
                                 f"kube.namespace={NS}", "kube.ray_workers=2", "kube.worker_cpu=1",
                                 "kube.worker_memory=2Gi", "kube.poll_s=1", "kube.backoff_limit=1"])
    dataset_uri = cache_dataset(cfg).uri
    run_uri = layout.run_uri(cluster_config(cfg), dataset_uri)
    killed: list[int] = []

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            if list_checkpoints(run_uri) and (pids := _driver_pids(world)):
                for pid in pids:
                    os.kill(pid, 9)
                killed.extend(pids)
            time.sleep(0.5)

    threading.Thread(target=kill_after_first_checkpoint, daemon=True).start()
    started = time.monotonic()
    result = stages.train(cfg, dataset_uri, launcher="rayjob")
    print(f"RayJob on pod hosts, killed and retried: {time.monotonic() - started:.0f} s")
    assert killed and result.step == 10 and result.run_uri == run_uri and result.mlflow_run_id
    states = world["sim"].history[RunIdentity(run_uri).name()]
    assert "Retrying" in states and states[-1] == "Complete", states
    assert "attempt 2/2 started" in caplog.text and "resumed from" in caplog.text
    assert world["server"].store.created["rayclusters"] == 2

    runtime = world["runtime"]
    heads = [k for k in runtime.started if k[1] == "ray-head"]
    assert len(heads) == 2, "one head per attempt"
    for head_pod, _, argv, env in heads:
        cluster = head_pod.split("-head-")[0]
        assert argv == ["/bin/bash", "-c", "--", "ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536}; ray start --head "
                        " --block  --dashboard-agent-listen-port=52365  --dashboard-host=0.0.0.0  --memory=4294967296"
                        "  --metrics-export-port=8080  --num-cpus=0 "], "KubeRay's head command, run as written"
        # a container may have been restarted (the kubelet's back-off): one entry per start
        workers = [k for k in runtime.started if k[1] == "ray-worker" and k[0].startswith(f"{cluster}-workers-")]
        inits = {k[0] for k in runtime.started if k[1] == "wait-gcs-ready"}
        assert len({w[0] for w in workers}) == 2 and {w[0] for w in workers} <= inits
        assert all(f"--address={cluster}-head-svc.{NS}.svc.cluster.local:6379" in w[2][-1] and "--num-cpus=1" in
                   w[2][-1] for w in workers)
        for _, _, _, pod_env in [(head_pod, "", argv, env), *workers]:
            assert (pod_env["AWS_ACCESS_KEY_ID"], pod_env["MLFLOW_TRACKING_USERNAME"], pod_env["AWS_ENDPOINT_URL"]) \
                == ("testing", USER, world["s3"]), "the Secrets' and loomcfm-env's values, through the kubelet"
            assert pod_env["RAY_ADDRESS"] != "local"
    submitters = [k for k in runtime.started if k[1] == "ray-job-submitter"]
    assert submitters
    for _, _, argv, env in submitters:
        assert argv[:3] == ["/bin/bash", "-ce", "--"] and f" --no-wait --submission-id {env['RAY_JOB_SUBMISSION_ID']}" \
            f" -- loomcfm train " in argv[-1] and argv[-1].endswith(f"--follow {env['RAY_JOB_SUBMISSION_ID']}")
        assert f"ray job submit --address http://{env['RAY_DASHBOARD_ADDRESS']} " in argv[-1]

    # who read the dataset and who logged the metrics: the worker hosts, by their addresses
    s3_log, mlflow_log = (p.read_text() for p in world["logs"])
    worker_hosts = {runtime.assigned[k[0]] for k in runtime.started if k[1] == "ray-worker"}
    readers = _addresses(s3_log, "/root/datasets/") & set(runtime.assigned.values())
    assert worker_hosts <= readers, f"every Ray Train worker read its shards from S3: {readers} vs {worker_hosts}"
    loggers = _addresses(mlflow_log, "/api/2.0/mlflow/runs/log-batch") & set(runtime.assigned.values())
    assert loggers & worker_hosts, f"rank 0 logged its metrics to MLflow from its worker host: {loggers}"
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    request = urllib.request.Request(f"{world['mlflow']}/api/2.0/mlflow/runs/get?run_id={result.mlflow_run_id}",
                                     headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        run = json.loads(answer.read())["run"]
    assert {m["key"] for m in run["data"]["metrics"]} >= {"train/loss"}, run["data"]["metrics"]
    assert "[loomcfm-train-" in caplog.text, "the driver's log reached the launcher through the submitter pod"
