"""A real two-node Ray cluster on one machine: a node dies mid-training, comes back, and the run ends as if not.

Two network namespaces joined by a bridge (``ip netns``, veth pairs): the Ray head in one, a Ray worker node
in the other, each with its own HOME (so its own node-local shard cache, ``~/.cache/loomcfm``) and its own Ray
temp dir. Storage is a moto S3 server on the bridge's address, reachable from both nodes and from this test.
A 2-worker Ray Train run (one CPU per node, so one worker per node) trains until its first checkpoint is in
S3; then every process of the worker node is killed and the node started again. Ray Train's failure handling
(``FailureConfig(max_failures)``) restarts the worker group once the node is back, ``fit`` resumes from the
checkpoint, and the final LOOM table equals that of an uninterrupted run on the same cluster.

The network namespaces are :mod:`tests.netns`'s. Needs root and iproute2 (CI runs as root; ``.ci/run`` installs
iproute2 when it is missing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import pytest

from loomcfm_core.config import load_config
from loomcfm_core.data.cache import cache_dataset
from tests.conftest import free_port
from tests.netns import IFACE, Network, require_ip_netns
from tests.training import TINY

RAY = str(Path(sys.executable).parent / "ray")


class Cluster:
    """Hosts ``head`` (.1) and ``worker`` (.2) on a bridge (.254) of :class:`tests.netns.Network`."""

    def __init__(self, root: Path) -> None:
        self.net, self.root, self.names = Network(), root, {}
        self.ray_temp = Path(tempfile.mkdtemp(prefix="lc", dir="/tmp"))  # Ray's socket paths: at most 107 bytes

    @property
    def bridge_ip(self) -> str:
        return self.net.bridge_ip

    def up(self) -> None:
        self.net.up()
        for node in ("head", "worker"):
            self.names[node], address = self.net.add(node[0])
            setattr(self, f"{node}_ip", address)

    def pids(self, node: str) -> list[int]:
        return self.net.pids(self.names[node])

    def kill(self, node: str) -> None:
        self.net.kill(self.names[node])

    def down(self) -> None:
        self.net.down()
        shutil.rmtree(self.ray_temp, ignore_errors=True)

    @property
    def procs(self) -> list:
        return self.net.procs

    def env(self, node: str, s3: str) -> dict[str, str]:
        home = self.root / f"{node}-home"
        home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
        env.update(HOME=str(home), AWS_ENDPOINT_URL=s3, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_DEFAULT_REGION="us-east-1", GLOO_SOCKET_IFNAME=IFACE, RAY_USAGE_STATS_ENABLED="0",
                   # notice a dead node within seconds, not the default half minute
                   RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
                   RAY_health_check_failure_threshold="3")
        return env

    def run(self, node: str, args: list[str], env: dict[str, str], **popen) -> subprocess.Popen:
        return self.net.run(self.names[node], args, env, cwd=self.root, text=True, **popen)

    def start_node(self, node: str, s3: str, attempt: int = 0) -> None:
        temp = self.ray_temp / f"{node[0]}{attempt}"
        args = [RAY, "start", f"--node-ip-address={self.head_ip if node == 'head' else self.worker_ip}",
                "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp}", "--disable-usage-stats"]
        args += ["--head", "--port=6379", "--include-dashboard=false"] if node == "head" else \
            [f"--address={self.head_ip}:6379"]
        proc = self.run(node, args, self.env(node, s3), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"ray start ({node}) failed:\n{out[-4000:]}"


@pytest.fixture()
def cluster(tmp_path):
    require_ip_netns()
    cluster = Cluster(tmp_path)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


@pytest.fixture()
def bridge_s3(cluster, tmp_path, monkeypatch):
    """A moto S3 server on the bridge address, with a bucket; this process's AWS variables point at it."""
    port = free_port()
    with open(tmp_path / "moto.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", cluster.bridge_ip, "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    cluster.procs.append(proc)
    endpoint = f"http://{cluster.bridge_ip}:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                         region_name="us-east-1").list_buckets()
            break
        except Exception:  # noqa: BLE001 - not listening yet
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "moto.log").read_text()
            time.sleep(0.2)
    for key, value in cluster.env("test", endpoint).items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    bucket = f"multinode-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return endpoint, bucket


def _train(cluster, s3, bucket, dataset_uri, run_name):
    args = [sys.executable, "-m", "loomcfm_core.cli", "train", "--dataset", dataset_uri]
    for item in (*TINY, f"storage.root=s3://{bucket}/root", f"tracking.local_dir={cluster.root / 'runs'}",
                 f"ray.address={cluster.head_ip}:6379", "ray.num_workers=2", "ray.max_failures=3",
                 "train.max_steps=30", "train.checkpoint_every=10", f"train.run_name={run_name}"):
        args += ["--set", item]
    return cluster.run("head", args, cluster.env("driver", s3), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _summary(proc, timeout):
    """The run's result as the CLI printed it; Ray may still forward worker log lines after it."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    decoder = json.JSONDecoder()
    for start in reversed([m.start() + 1 for m in re.finditer(r"\n\{", out)]):
        try:
            result, _ = decoder.raw_decode(out, start)
        except ValueError:
            continue
        if "table_hashes" in result:
            return result, out
    pytest.fail(f"no result printed:\n{out[-6000:]}")


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_killed_worker_node_rejoins_and_training_ends_as_uninterrupted(cluster, bridge_s3, tmp_path):
    s3, bucket = bridge_s3
    cluster.start_node("head", s3)
    cluster.start_node("worker", s3)
    cfg = load_config("digits", [*TINY, f"storage.root=s3://{bucket}/root"])
    dataset_uri = cache_dataset(cfg).uri

    reference, _ = _summary(_train(cluster, s3, bucket, dataset_uri, "straight"), timeout=240)
    assert reference["step"] == 30 and len(set(reference["table_hashes"])) == 1

    interrupted = _train(cluster, s3, bucket, dataset_uri, "interrupted")
    s3_client = boto3.client("s3", endpoint_url=s3)
    first = "root/runs/interrupted/checkpoints/step-00000010.pt"
    deadline = time.monotonic() + 240
    while "Contents" not in s3_client.list_objects_v2(Bucket=bucket, Prefix=first):
        assert interrupted.poll() is None, interrupted.stdout.read()[-6000:]
        assert time.monotonic() < deadline, "no first checkpoint within 240 s"
        time.sleep(0.3)
    cluster.kill("worker")
    assert not cluster.pids("worker")
    cluster.start_node("worker", s3, attempt=1)

    resumed, out = _summary(interrupted, timeout=240)
    assert "resumed from" in out, "the restarted worker group resumed from a checkpoint"
    assert resumed["step"] == 30
    assert resumed["table_hashes"] == reference["table_hashes"]
    name = dataset_uri.rstrip("/").rsplit("/", 1)[-1]
    for node in ("head", "worker"):
        shards = list((tmp_path / f"{node}-home" / ".cache" / "loomcfm" / "datasets" / name).rglob("*.h5"))
        assert shards, f"the {node} node read its shards from its own node-local copy"
