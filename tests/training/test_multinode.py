"""A real two-node Ray cluster on one machine: a node dies mid-training, comes back, and the run ends as if not.

Two network namespaces joined by a bridge (``ip netns``, veth pairs): the Ray head in one, a Ray worker node
in the other, each with its own HOME (so its own node-local shard cache, ``~/.cache/loomcfm``) and its own Ray
temp dir. Storage is a moto S3 server on the bridge's address, reachable from both nodes and from this test.
A 2-worker Ray Train run (one CPU per node, so one worker per node) trains until its first checkpoint is in
S3; then every process of the worker node is killed and the node started again. Ray Train's failure handling
(``FailureConfig(max_failures)``) restarts the worker group once the node is back, ``fit`` resumes from the
checkpoint, and the final LOOM table equals that of an uninterrupted run on the same cluster.

Needs root and iproute2 (CI runs as root; ``.ci/run`` installs iproute2 when it is missing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
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
from tests.training import TINY

RAY = str(Path(sys.executable).parent / "ray")
IFACE = "lceth0"  # the node's end of its veth pair, the same name inside each namespace


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Cluster:
    """Namespaces ``<tag>h`` (head, .1) and ``<tag>w`` (worker, .2) on bridge ``<tag>br`` (.254)."""

    def __init__(self, root: Path) -> None:
        self.tag = f"lc{os.getpid() % 100000}"
        third = 100 + os.getpid() % 150
        self.subnet = f"10.{third}.{os.getpid() // 150 % 250}"
        self.bridge_ip, self.head_ip, self.worker_ip = (f"{self.subnet}.{i}" for i in (254, 1, 2))
        self.root, self.names, self.procs = root, {"head": f"{self.tag}h", "worker": f"{self.tag}w"}, []
        self.ray_temp = Path(tempfile.mkdtemp(prefix="lc", dir="/tmp"))  # Ray's socket paths: at most 107 bytes

    def up(self) -> None:
        br = f"{self.tag}br"
        _ip("link", "add", br, "type", "bridge")
        _ip("addr", "add", f"{self.bridge_ip}/24", "dev", br)
        _ip("link", "set", br, "up")
        for node, address in (("head", self.head_ip), ("worker", self.worker_ip)):
            ns, outer, inner = self.names[node], f"{self.names[node]}0", f"{self.names[node]}1"
            _ip("netns", "add", ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", br)
            _ip("link", "set", outer, "up")
            for args in (("link", "set", inner, "name", IFACE), ("addr", "add", f"{address}/24", "dev", IFACE),
                         ("link", "set", IFACE, "up"), ("link", "set", "lo", "up"),
                         ("route", "add", "default", "via", self.bridge_ip)):
                _ip("-n", ns, *args)

    def pids(self, node: str) -> list[int]:
        """The live (not zombie) processes in the node's namespace."""
        out = subprocess.run(["ip", "netns", "pids", self.names[node]], capture_output=True, text=True).stdout
        return [int(p) for p in out.split() if _state(int(p)) not in ("Z", "X", "")]

    def kill(self, node: str, timeout: float = 20.0) -> None:
        """SIGKILL every process in the node's namespace (all of them were started by this test), again until
        none is left: a dying raylet may still have started a worker."""
        deadline = time.monotonic() + timeout
        while (pids := self.pids(node)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def down(self) -> None:
        for node in self.names:
            self.kill(node)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for ns in self.names.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{self.tag}br"], capture_output=True)
        shutil.rmtree(self.ray_temp, ignore_errors=True)

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
        proc = subprocess.Popen(["ip", "netns", "exec", self.names[node], *args], env=env, cwd=self.root, text=True,
                                **popen)
        self.procs.append(proc)
        return proc

    def start_node(self, node: str, s3: str, attempt: int = 0) -> None:
        temp = self.ray_temp / f"{node[0]}{attempt}"
        args = [RAY, "start", f"--node-ip-address={self.head_ip if node == 'head' else self.worker_ip}",
                "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp}", "--disable-usage-stats"]
        args += ["--head", "--port=6379", "--include-dashboard=false"] if node == "head" else \
            [f"--address={self.head_ip}:6379"]
        proc = self.run(node, args, self.env(node, s3), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"ray start ({node}) failed:\n{out[-4000:]}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _require_ip_netns() -> None:
    if shutil.which("ip") is None:
        pytest.fail("this test needs the `ip` command (Debian package iproute2; `.ci/run` installs it as root)")
    if os.geteuid() != 0:
        pytest.fail("this test creates network namespaces (`ip netns add`) and must run as root, as CI does")


@pytest.fixture()
def cluster(tmp_path):
    _require_ip_netns()
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
