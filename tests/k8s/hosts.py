"""Pods that are real hosts: the container runtime of the simulated cluster (tests/k8s/kubelet_sim.py) when each
pod is a network namespace on a bridge (:mod:`tests.netns`) with its own address, running its containers'
commands as KubeRay v1.7.0 wrote them (the head's ``ray start --head ...``, the workers' ``wait-gcs-ready`` and
``ray start --address=<head service>:6379``, the submitter's ``ray job submit`` script) with the environment the
kubelet resolved from the pod spec, Secrets and ConfigMaps.

What the image and the node would give a container is the machine's: this Python environment on ``PATH`` (the
image has the package installed: ``PYTHONPATH`` here), a ``HOME`` and ``TMPDIR`` of its own (a container's
filesystem; Ray's sockets and session folders live there), and an ``/etc/hosts`` as the kubelet and cluster DNS
would answer: the pod's own name and the machine's hostname (a pod's hostname is its name) resolve to its
address, every Service of the store to the addresses of its ready-or-not pods (KubeRay's head Service is
headless with ``publishNotReadyAddresses``). There is no DNS server on the bridge, so gRPC (Ray's GCS client)
resolves with the C library, which reads that file (``GRPC_DNS_RESOLVER=native``; its default, c-ares, would ask
the machine's name server, unreachable from the hosts, and never answer). Ray sizes its object store from the memory it sees, the machine's
here rather than a container's cgroup, so its share is set down (``RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION``).

The readiness probe is the pod's own HTTP probe (``/api/healthz`` on 52365) sent to the pod's address, and the
operator asks each head's real dashboard (``/api/jobs/<id>``) through :class:`Dashboards`.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.k8s.apiserver import Store
from tests.k8s.runtime_sim import Unreachable
from tests.netns import Network

REPO = Path(__file__).resolve().parents[2]
PROBE_EVERY_S = 1.0


@dataclass
class Handle:
    proc: subprocess.Popen
    checked: float = 0.0
    ready: bool = False


class HostRuntime:
    """Each pod a host of ``net``; see the module docstring."""

    def __init__(self, store: Store, net: Network, root: Path):
        self.store, self.net, self.root = store, net, root
        self.pods: dict[str, tuple[str, str, dict]] = {}  # uid -> (netns, address, pod)
        self.temp = Path(tempfile.mkdtemp(prefix="lcp", dir="/tmp"))  # short: Ray's socket paths <= 107 bytes
        self.dashboards = Dashboards(self)
        self.lock = threading.RLock()
        self.assigned: dict[str, str] = {}  # pod name -> its address (kept after the pod is gone)
        self.started: list[tuple[str, str, list[str], dict[str, str]]] = []  # (pod, container, argv, env)

    # ---- addresses and names ----------------------------------------------------------------------------

    def sandbox(self, pod: dict) -> str:
        with self.lock:
            uid = pod["metadata"]["uid"]
            if uid not in self.pods:
                ns, address = self.net.add(f"p{len(self.pods) + 1}")
                self.pods[uid] = (ns, address, pod)
                self.assigned[pod["metadata"]["name"]] = address
                self.refresh()
            return self.pods[uid][1]

    def release(self, uid: str) -> None:
        with self.lock:
            if uid in self.pods:
                self.net.remove(self.pods.pop(uid)[0])

    def addresses(self, namespace: str, service: str) -> list[str]:
        """The pod addresses behind a Service (its selector over the pods this runtime runs)."""
        try:
            selector = self.store.get("services", namespace, service)["spec"].get("selector") or {}
        except Exception:  # noqa: BLE001 - no such Service: no addresses
            return []
        return [address for _, address, pod in self.pods.values() if pod["metadata"]["namespace"] == namespace
                and selector and all(pod["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]

    def resolve(self, host: str) -> str | None:
        """A Service's DNS name (``<svc>.<ns>.svc.cluster.local``) as cluster DNS answers it, first address."""
        service, namespace = (host.split(".") + [""])[:2]
        found = self.addresses(namespace, service)
        return found[0] if found else None

    def refresh(self) -> None:
        """Every host's /etc/hosts: itself, and every Service's addresses."""
        lines = []
        for service in self.store.list("services", None):
            name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
            for address in self.addresses(namespace, name):
                lines.append(f"{address} {name}.{namespace}.svc.cluster.local {name}.{namespace}.svc {name}.{namespace}")
        for ns, address, pod in self.pods.values():
            own = f"{address} {pod['metadata']['name']} {socket.gethostname()}\n"
            self.net.write_hosts(ns, own + "".join(f"{line}\n" for line in lines))

    # ---- containers -------------------------------------------------------------------------------------

    def pull(self, image: str) -> str | None:
        return None  # the image is this machine's Python environment

    def _base_env(self, pod: dict, container: dict) -> dict[str, str]:
        folder = self.root / pod["metadata"]["name"]
        (folder / "home").mkdir(parents=True, exist_ok=True)
        temp = self.temp / f"{len(os.listdir(self.temp))}"
        temp.mkdir()
        return {"PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
                "HOME": str(folder / "home"), "TMPDIR": str(temp), "PYTHONPATH": str(REPO), "LANG": "C.UTF-8",
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.05",
                "GRPC_DNS_RESOLVER": "native"}

    def start(self, pod, container, env, log):
        ns = self.pods[pod["metadata"]["uid"]][0]
        with self.lock:
            self.refresh()
        argv = [*container.get("command", []), *container.get("args", [])]
        self.started.append((pod["metadata"]["name"], container["name"], argv, dict(env)))
        proc = self.net.run(ns, argv, {**self._base_env(pod, container), **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=self.root, start_new_session=True)
        threading.Thread(target=lambda: [log(line.rstrip("\n")) for line in proc.stdout], daemon=True).start()
        return Handle(proc)

    def exited(self, handle: Handle) -> int | None:
        return handle.proc.poll()

    def kill(self, handle: Handle) -> None:
        if handle.proc.poll() is None:
            try:
                os.killpg(handle.proc.pid, 9)
            except ProcessLookupError:
                pass
        handle.proc.wait()

    def probe(self, pod, container, handle: Handle) -> bool:
        """The container's HTTP readiness probe, sent to the pod's address (at most every second)."""
        check = (container.get("readinessProbe") or {}).get("httpGet")
        if check is None:
            return handle.proc.poll() is None
        if time.monotonic() - handle.checked < PROBE_EVERY_S:
            return handle.ready
        handle.checked = time.monotonic()
        address = self.pods[pod["metadata"]["uid"]][1]
        try:
            with urllib.request.urlopen(f"http://{address}:{check['port']}{check['path']}", timeout=2) as answer:
                handle.ready = 200 <= answer.status < 400
        except (urllib.error.URLError, OSError):
            handle.ready = False
        return handle.ready

class Dashboards:
    """The heads' real Ray dashboards, as KubeRay's dashboard client asks them (``GET /api/jobs/<id>``,
    ``POST /api/jobs/<id>/stop``); a host name is resolved as cluster DNS would."""

    def __init__(self, runtime: HostRuntime):
        self.runtime = runtime
        self.runs: dict = {}  # no simulated jobs here
        self.attempts: dict = {}
        self.attempt = None
        self.lock = threading.RLock()

    def tick(self) -> None:
        pass

    def _url(self, host: str, path: str) -> str:
        address = self.runtime.resolve(host)
        if address is None:
            raise Unreachable(f"no address for {host}")
        return f"http://{address}:8265{path}"

    def info(self, host: str, job_id: str) -> dict | None:
        try:
            with urllib.request.urlopen(self._url(host, f"/api/jobs/{job_id}"), timeout=5) as answer:
                job = json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise Unreachable(str(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            raise Unreachable(str(exc)) from None
        def stamp(ms: int | None) -> datetime.datetime | None:
            return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc) if ms else None

        return {"status": job["status"], "message": job.get("message") or "", "startTime": stamp(job.get("start_time")),
                "endTime": stamp(job.get("end_time"))}

    def stop(self, job_id: str, host: str = "") -> None:
        request = urllib.request.Request(self._url(host, f"/api/jobs/{job_id}/stop"), method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=5):
            pass
