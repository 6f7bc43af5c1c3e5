"""The checks only a pod of the cluster can make, and the probe pod that makes them for ``loomcfm cluster check``.

Inside a pod (``loomcfm cluster check --inside``, or a pipeline's check step): the MLflow server answers with
the credentials the Secret gave this pod (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``), ``storage.root`` takes
a write, a read back and a delete, and ``/dev/shm`` is as large as configured (Ray's object store and
DataLoader workers live there; a container's default is 64 MiB).

From outside, the probe pod is the RayJob's worker pod in miniature: the configured image, ServiceAccount,
security context, node selector, tolerations and the same Secret and ConfigMap references, a memory-backed
``/dev/shm`` sized as KubeRay sizes the workers' (their memory limit), running ``loomcfm cluster check
--inside``. That it is scheduled, pulls and starts is itself the first check; its rows come back through its
log (one ``LOOMCFM_CHECKS <json>`` line). It is deleted afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import asdict

from loomcfm_core.config import Config
from loomcfm_core.kube.client import REQUEST_TIMEOUT, KubeApi, describe
from loomcfm_core.kube.platform import MLFLOW_SECRET, S3_SECRET
from loomcfm_core.kube.pods import cause_of
from loomcfm_core.kube.preflight import Check
from loomcfm_core.kube.settings import parse_quantity
from loomcfm_core.storage import is_remote, join, storage_for
from loomcfm_core.tracking import is_server

MARK = "LOOMCFM_CHECKS "
PROBE_CPU, PROBE_MEMORY = "250m", "512Mi"


def mlflow(uri: str) -> Check:
    """One authenticated request to the tracking server's REST API (``experiments/search``)."""
    if not is_server(uri):
        return Check("MLflow", True, f"{uri}: a local store, no server to ask")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1")
    if user:
        token = base64.b64encode(f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10):
            return Check("MLflow", True, f"{uri} answered" + (f" as {user}" if user else ""))
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            who = f"user {user!r}" if user else "no credentials (MLFLOW_TRACKING_USERNAME unset)"
            return Check("MLflow", False, f"{uri} refused {who}: HTTP {exc.code}",
                         f"put the MLflow user's name and password into Secret {MLFLOW_SECRET} (its "
                         "MLFLOW_TRACKING_USERNAME/PASSWORD must be a user of the server)")
        return Check("MLflow", False, f"{uri}: HTTP {exc.code}", "check the MLflow server's log: kubectl -n "
                     "<namespace> logs deploy/mlflow")
    except (urllib.error.URLError, OSError) as exc:
        return Check("MLflow", False, f"cannot reach {uri}: {getattr(exc, 'reason', exc)}",
                     "check tracking.uri (LOOMCFM_TRACKING_URI in loomcfm-env) and the NetworkPolicy "
                     "loomcfm-services (k8s/base/networkpolicy.yaml admits loomcfm and kubeflow)")


def storage(root: str) -> Check:
    """Write, read back and delete one small object under ``storage.root``."""
    where = join(root, ".loomcfm-check", f"{os.uname().nodename}-{secrets.token_hex(4)}")
    text = secrets.token_hex(16)
    fix = (f"check the bucket of storage.root, the keys in Secret {S3_SECRET} and AWS_ENDPOINT_URL in "
           "loomcfm-env (an S3-compatible store)")
    try:
        store = storage_for(where)
        store.write_text(where, text)
        back = store.read_text(where)
        store.delete(where)
    except Exception as exc:  # noqa: BLE001 - any failure of the store is the finding
        return Check("storage", False, f"{root}: {type(exc).__name__}: {exc}"[:400], fix)
    if back != text:
        return Check("storage", False, f"{root}: read back something else than was written", fix)
    return Check("storage", True, f"{root}: written, read back, deleted" + ("" if is_remote(root) else
                                                                           " (a local folder)"))


def shm(expected: str) -> Check:
    """``/dev/shm``'s size against ``expected`` (a quantity)."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError as exc:
        return Check("/dev/shm", False, f"cannot stat: {exc}", "mount an emptyDir {medium: Memory} at /dev/shm")
    size = stat.f_blocks * stat.f_frsize
    want = parse_quantity(expected)
    text = f"{size / 2**20:.0f} MiB"
    if size < want:
        return Check("/dev/shm", False, f"{text}, expected at least {expected}",
                     f"mount an emptyDir {{medium: Memory, sizeLimit: {expected}}} at /dev/shm")
    return Check("/dev/shm", True, f"{text} (at least {expected})")


def inside(cfg: Config, shm_size: str) -> list[Check]:
    return [mlflow(cfg.tracking.uri or ""), storage(cfg.storage.root), shm(shm_size)]


def report(checks: list[Check]) -> str:
    """The line the outer check reads back from the probe pod's log."""
    return MARK + json.dumps([asdict(c) for c in checks])


def probe_pod(rayjob: dict, cfg: Config, name: str) -> dict:
    """The probe pod: the RayJob's worker pod template with the probe's command and a small footprint."""
    group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    spec = json.loads(json.dumps(group["template"]["spec"]))
    worker = spec["containers"][0]
    memory = (worker.get("resources") or {}).get("limits", {}).get("memory", PROBE_MEMORY)
    amounts = {"cpu": PROBE_CPU, "memory": PROBE_MEMORY}
    container = {"name": "check", "image": worker["image"], "env": [*worker.get("env", []), {
        "name": "LOOMCFM_CONFIG_YAML", "value": cfg.to_yaml()}], "envFrom": worker.get("envFrom", []),
        "command": ["loomcfm", "cluster", "check", "--inside", "--shm", memory],
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}
    if "securityContext" in worker:
        container["securityContext"] = worker["securityContext"]
    spec.update(containers=[container], restartPolicy="Never", activeDeadlineSeconds=600,
                volumes=[{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": memory}}])
    spec.pop("initContainers", None)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {
        "app.kubernetes.io/name": "loomcfm", "app.kubernetes.io/component": "cluster-check"}}, "spec": spec}


def run_probe(api: KubeApi, rayjob: dict, cfg: Config, timeout_s: float = 300.0, poll_s: float = 2.0) -> list[Check]:
    """Create the probe pod, wait for its end (or a cause that will not clear), read its rows, delete it."""
    from kubernetes.client.exceptions import ApiException

    ns, name = api.namespace, f"loomcfm-check-{secrets.token_hex(3)}"
    image = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"]
    try:
        api.core.create_namespaced_pod(ns, probe_pod(rayjob, cfg, name), _request_timeout=REQUEST_TIMEOUT)
    except ApiException as exc:
        return [Check("probe pod", False, f"cannot create a pod in {ns}: {describe(exc)}",
                      "run the check as a user who may create pods there, or pass --no-probe")]
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            pod = api.core.read_namespaced_pod(name, ns, _request_timeout=REQUEST_TIMEOUT)
            cause = cause_of(pod)
            if pod.status is not None and pod.status.phase in ("Succeeded", "Failed"):
                break
            if cause is not None and cause.deterministic:
                return [Check("probe pod", False, f"{image}: {cause.reason}: {cause.message}", cause.kubectl(ns))]
            if time.monotonic() > deadline:
                phase = pod.status.phase if pod.status else "Pending"
                why = f"{cause.reason}: {cause.message}" if cause else f"{phase} after {timeout_s:.0f} s"
                return [Check("probe pod", False, f"{image}: {why}", f"kubectl -n {ns} describe pod {name}")]
            time.sleep(poll_s)
        log = api.core.read_namespaced_pod_log(name, ns, _request_timeout=REQUEST_TIMEOUT) or ""
        rows = next((json.loads(line[len(MARK):]) for line in reversed(log.splitlines()) if line.startswith(MARK)), None)
        if rows is None:
            return [Check("probe pod", False, f"{image} started on {pod.spec.node_name} but printed no result "
                          f"(exit {pod.status.phase}): {log.strip()[-300:]}", f"kubectl -n {ns} logs {name}")]
        return [Check("probe pod", True, f"{image} pulled and started on {pod.spec.node_name}"),
                *(Check(**row) for row in rows)]
    finally:
        try:
            api.core.delete_namespaced_pod(name, ns, _request_timeout=REQUEST_TIMEOUT)
        except (ApiException, OSError):
            pass
