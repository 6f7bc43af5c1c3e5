"""KubeRay v1.7.0's RayCluster controller below a RayJob: the head and worker pods it builds, the head Service,
the events and the status a RayJob waits on.

From ``ray-operator/`` at tag v1.7.0 (research-issue20.md §1a, §1b, §1f):

* ``controllers/ray/common/pod.go``: ``DefaultHeadPodTemplate``/``DefaultWorkerPodTemplate`` (labels from
  ``labelPod``, ``generateName`` from ``utils.PodName``, the worker's ``wait-gcs-ready`` init container with the
  Ray container's env and 200m/256Mi), ``BuildPod`` (the ``/dev/shm`` emptyDir sized by the container's memory,
  ``makeEmptyDirVolume``/``findMemoryReqOrLimit``; command ``/bin/bash -c --`` with
  ``ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536}; ray start ...``), ``setMissingRayStartParams``,
  ``generateRayStartCommand`` (``num-cpus`` from the CPU limit rounded up, ``memory`` in bytes, ``num-gpus``),
  ``convertParamMap`` (sorted, ``" --%s "`` / ``" --%s=%s "``), ``setContainerEnvVars``,
  ``setInitContainerEnvVars``, ``initLivenessAndReadinessProbe`` (HTTP ``/api/healthz`` on 52365 for
  rayVersion >= 2.53.0);
* ``common/service.go`` ``BuildServiceForHeadPod``: ``<cluster>-head-svc``, headless, ports from the head
  container (``metrics`` 8080 added), sorted by name;
* ``raycluster_controller.go`` ``reconcilePods`` (a head missing or terminal is (re)created; workers up to
  ``GetWorkerGroupDesiredReplicas``, none for a suspended group) with its events (``CreatedHeadPod``,
  ``CreatedWorkerPod``, ``DeletedHeadPod``, ``DeletedWorkerPod``, ``CreatedService``), and ``calculateStatus``
  with ``utils.CheckAllPodsRunning``: ``state: ready`` once every pod (the desired workers + 1) runs with no
  ``Ready`` condition other than True; never reset; ``HeadPodReady`` from ``FindHeadPodReadyCondition``
  (a ``ContainersNotReady`` reason is replaced by the first waiting/terminated container's).
"""

from __future__ import annotations

import copy
import math

from loomcfm_core.kube.settings import parse_quantity
from tests.k8s import events
from tests.k8s.apiserver import ApiError, Store, rfc3339

HEAD_PORT, DASHBOARD_PORT, AGENT_PORT, METRICS_PORT = 6379, 8265, 52365, 8080
DEFAULT_PORTS = {"client": 10001, "gcs-server": HEAD_PORT, "dashboard": DASHBOARD_PORT, "metrics": METRICS_PORT,
                 "serve": 8000}
TERMINAL = ("Failed", "Succeeded")
COMPONENT = "raycluster-controller"
KUBERAY_VERSION = "v1.7.0"


def fqdn(cluster: str, namespace: str) -> str:
    return f"{cluster}-head-svc.{namespace}.svc.cluster.local"


def convert_params(params: dict[str, str]) -> str:
    flags = ""
    for option in sorted(params):
        argument = params[option]
        if argument.lower() in ("true", "false") and option not in ("log-color", "include-dashboard",
                                                                    "include-log-monitor"):
            flags += f" --{option} " if argument.lower() == "true" else ""
        else:
            flags += f" --{option}={argument} "
    return flags


def ray_start(node_type: str, params: dict[str, str], resources: dict, cluster: str, namespace: str) -> str:
    """``setMissingRayStartParams`` then ``generateRayStartCommand``."""
    params = {k: str(v) for k, v in (params or {}).items()}
    if node_type == "worker":
        params.setdefault("address", f"{fqdn(cluster, namespace)}:{HEAD_PORT}")
    else:
        params.setdefault("dashboard-host", "0.0.0.0")
    params.setdefault("metrics-export-port", str(METRICS_PORT))
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", str(AGENT_PORT))
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    if "num-cpus" not in params and (limits.get("cpu") or requests.get("cpu")):
        params["num-cpus"] = str(math.ceil(parse_quantity(str(limits.get("cpu") or requests["cpu"]))))
    if "memory" not in params and limits.get("memory"):
        params["memory"] = str(math.ceil(parse_quantity(str(limits["memory"]))))
    if "num-gpus" not in params and limits.get("nvidia.com/gpu"):
        params["num-gpus"] = str(int(parse_quantity(str(limits["nvidia.com/gpu"]))))
    return f"ray start{' --head' if node_type == 'head' else ''} {convert_params(params)}"


def _wait_gcs(container: dict, address: str) -> dict:
    script = f"""
					SECONDS=0
					while true; do
						if (( SECONDS <= 120 )); then
							if ray health-check --address {address} > /dev/null 2>&1; then
								echo "GCS is ready."
								break
							fi
							echo "$SECONDS seconds elapsed: Waiting for GCS to be ready."
						else
							if ray health-check --address {address}; then
								echo "GCS is ready. Any error messages above can be safely ignored."
								break
							fi
							echo "$SECONDS seconds elapsed: Still waiting for GCS to be ready. For troubleshooting, refer to the FAQ at https://docs.ray.io/en/master/cluster/kubernetes/troubleshooting.html."
						fi
						sleep 5
					done
				"""  # noqa: E501 (pod.go's text, tabs included)
    amounts = {"cpu": "200m", "memory": "256Mi"}
    init = {"name": "wait-gcs-ready", "image": container.get("image"), "command": ["/bin/bash", "-c", "--"],
            "args": [script], "env": copy.deepcopy(container.get("env", [])),
            "resources": {"limits": dict(amounts), "requests": dict(amounts)}}
    for key in ("imagePullPolicy", "securityContext", "volumeMounts"):
        if key in container:
            init[key] = copy.deepcopy(container[key])
    return init


def _field(path: str) -> dict:
    return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def build_pod(cluster: dict, group: dict, node_type: str) -> dict:
    """The pod ``BuildPod`` makes for the head group or a worker group of ``cluster``."""
    name, ns = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    group_name = "headgroup" if node_type == "head" else group["groupName"]
    template = copy.deepcopy(group["template"])
    spec = template["spec"]
    ray = spec["containers"][0]
    address = f"{fqdn(name, ns)}:{HEAD_PORT}"
    labels = {**(template.get("metadata", {}).get("labels") or {}), "ray.io/node-type": node_type,
              "ray.io/group": group_name, "ray.io/cluster": name, "ray.io/is-ray-node": "yes",
              "ray.io/identifier": f"{name}-{node_type}", "app.kubernetes.io/name": "kuberay",
              "app.kubernetes.io/created-by": "kuberay-operator"}
    if node_type == "worker":
        labels["ray.io/worker-group-replica-index"] = "0"
        spec["initContainers"] = [*spec.get("initContainers", []), _wait_gcs(ray, f"{fqdn(name, ns)}:{HEAD_PORT}")]
    if not any(p.get("name") == "metrics" for p in ray.get("ports", [])):
        ray["ports"] = [*ray.get("ports", []), {"name": "metrics", "containerPort": METRICS_PORT}]
    params = dict(group.get("rayStartParams") or {})
    if "plasma-directory" not in params:
        memory = (ray.get("resources", {}).get("limits") or {}).get("memory") or \
            (ray.get("resources", {}).get("requests") or {}).get("memory")
        spec["volumes"] = [*spec.get("volumes", []), {"name": "shared-mem", "emptyDir": {
            "medium": "Memory", **({"sizeLimit": memory} if memory else {})}}]
        ray["volumeMounts"] = [*ray.get("volumeMounts", []), {"name": "shared-mem", "mountPath": "/dev/shm"}]
    start = ray_start(node_type, params, ray.get("resources") or {}, name, ns)
    user = " ".join([*ray.get("command", []), *ray.get("args", [])])
    if "ray start" not in user:
        generated = f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {start}"
        ray["command"] = ["/bin/bash", "-c", "--"]
        ray["args"] = [f"{user} && {generated}" if user else generated]
    for init in spec.get("initContainers", []):
        init["env"] = [*init.get("env", []), {"name": "FQ_RAY_IP", "value": fqdn(name, ns)},
                       {"name": "RAY_IP", "value": f"{name}-head-svc"}]
    env, names = ray.setdefault("env", []), {e["name"] for e in ray.get("env", [])}
    if node_type == "worker":
        env += [{"name": "FQ_RAY_IP", "value": fqdn(name, ns)}, {"name": "RAY_IP", "value": f"{name}-head-svc"}]
    env += [{"name": "RAY_CLUSTER_NAME", **_field("metadata.labels['ray.io/cluster']")},
            {"name": "RAY_CLUSTER_NAMESPACE", **_field("metadata.namespace")},
            {"name": "RAY_CLOUD_INSTANCE_ID", **_field("metadata.name")},
            {"name": "RAY_NODE_TYPE_NAME", **_field("metadata.labels['ray.io/group']")},
            {"name": "KUBERAY_GEN_RAY_START_CMD", "value": start}]
    defaults = [("RAY_PORT", str(HEAD_PORT)), ("RAY_ADDRESS", f"127.0.0.1:{HEAD_PORT}" if node_type == "head"
                                                else address), ("RAY_USAGE_STATS_KUBERAY_IN_USE", "1")]
    env += [{"name": k, "value": v} for k, v in defaults if k not in names]
    if node_type == "head":
        env.append({"name": "RAY_USAGE_STATS_EXTRA_TAGS", "value": f"kuberay_version={KUBERAY_VERSION};"
                    f"kuberay_crd={'RayJob' if 'ray.io/originated-from-crd' in cluster['metadata'].get('labels', {}) else 'RayCluster'}"})
    if "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE" not in names:
        env.append({"name": "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE", "value": "1"})
    probe = {"httpGet": {"path": "/api/healthz", "port": int(params.get("dashboard-agent-listen-port", AGENT_PORT))},
             "periodSeconds": 5, "successThreshold": 1}
    timeout = 5 if node_type == "head" else 2
    ray.setdefault("livenessProbe", {**probe, "initialDelaySeconds": 30, "timeoutSeconds": timeout,
                                     "failureThreshold": 120})
    ray.setdefault("readinessProbe", {**probe, "initialDelaySeconds": 10, "timeoutSeconds": timeout,
                                      "failureThreshold": 10})
    prefix = f"{name}-head-" if node_type == "head" else f"{name}-{group_name}-worker-"
    owner = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "name": name, "uid": cluster["metadata"]["uid"],
             "controller": True, "blockOwnerDeletion": True}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "generateName": prefix[:50], "labels": labels, "annotations": template.get("metadata", {}).get("annotations", {}),
        "ownerReferences": [owner]}, "spec": spec}


def head_service(cluster: dict) -> dict:
    """``BuildServiceForHeadPod`` (headless by default)."""
    name = cluster["metadata"]["name"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    declared = {p.get("name") or f"{p['containerPort']}-port": p["containerPort"] for p in head.get("ports", [])}
    ports = declared or dict(DEFAULT_PORTS)
    ports.setdefault("metrics", METRICS_PORT)
    selector = {"ray.io/cluster": name, "ray.io/node-type": "head", "ray.io/identifier": f"{name}-head",
                "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {
        "name": f"{name}-head-svc", "labels": dict(selector), "ownerReferences": [{
            "apiVersion": "ray.io/v1", "kind": "RayCluster", "name": name, "uid": cluster["metadata"]["uid"],
            "controller": True, "blockOwnerDeletion": True}]},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": selector,
                 "ports": [{"name": k, "port": v, "appProtocol": "tcp"} for k, v in sorted(ports.items())]}}


def desired_workers(group: dict) -> int:
    """``GetWorkerGroupDesiredReplicas``."""
    if group.get("suspend"):
        return 0
    low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
    return min(max(group.get("replicas", low), low), high) * group.get("numOfHosts", 1)


def _ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def all_running(pods: list[dict]) -> bool:
    """``utils.CheckAllPodsRunning``."""
    if not pods:
        return False
    for pod in pods:
        status = pod.get("status", {})
        if status.get("phase") != "Running":
            return False
        if any(c["type"] == "Ready" and c["status"] != "True" for c in status.get("conditions", [])):
            return False
    return True


def head_ready_condition(head: dict | None) -> dict:
    """``FindHeadPodReadyCondition``."""
    if head is None:
        return {"type": "HeadPodReady", "status": "False", "reason": "HeadPodNotFound", "message": "Head Pod not found"}
    out = {"type": "HeadPodReady", "status": "False", "reason": "Unknown", "message": ""}
    ready = next((c for c in head.get("status", {}).get("conditions", []) if c["type"] == "Ready"), None)
    if ready is not None:
        out.update(status=ready["status"], message=ready.get("message", ""),
                   reason=ready.get("reason") or ("HeadPodRunningAndReady" if ready["status"] == "True" else ""))
        if out["reason"] == "ContainersNotReady":
            for status in head["status"].get("containerStatuses", []):
                state = status.get("state", {})
                detail = state.get("waiting") or state.get("terminated")
                if detail and detail.get("reason"):
                    out["reason"] = detail["reason"]
                    text = f"{status['name']}: {detail.get('message', '')}"
                    out["message"] = f"{out['message']}; {text}" if out["message"] else text
                    break
    return out


def _set_condition(old: list[dict], new: dict) -> dict:
    """``meta.SetStatusCondition``: ``lastTransitionTime`` is now when the status changes, else kept."""
    before = next((c for c in old if c["type"] == new["type"]), None)
    keep = before is not None and before["status"] == new["status"] and before.get("lastTransitionTime")
    return {**new, "lastTransitionTime": before["lastTransitionTime"] if keep else rfc3339()}


class RayClusterController:
    """Reconciles every RayCluster in ``store`` once per :meth:`tick`."""

    def __init__(self, store: Store):
        self.store = store

    def tick(self) -> None:
        for cluster in self.store.list("rayclusters", None):
            if not cluster["metadata"].get("deletionTimestamp"):
                self.reconcile(cluster)

    def _create(self, resource: str, cluster: dict, body: dict) -> dict | None:
        try:
            return self.store.create(resource, cluster["metadata"]["namespace"], body)[0]
        except ApiError:
            return None

    def reconcile(self, cluster: dict) -> None:
        ns, name = cluster["metadata"]["namespace"], cluster["metadata"]["name"]
        service = head_service(cluster)
        try:
            self.store.get("services", ns, service["metadata"]["name"])
        except ApiError:
            if self._create("services", cluster, service):
                events.record(self.store, cluster, "RayCluster", "CreatedService",
                              f"Created service {ns}/{service['metadata']['name']}", COMPONENT)
        pods = self.store.list("pods", ns, f"ray.io/cluster={name}")
        heads = [p for p in pods if p["metadata"]["labels"].get("ray.io/node-type") == "head"]
        for pod in pods:
            phase = pod.get("status", {}).get("phase")
            if phase in TERMINAL and not pod["metadata"].get("deletionTimestamp"):
                self.store.delete("pods", ns, pod["metadata"]["name"])
                kind = "Head" if pod in heads else "Worker"
                note = (f"Deleted head Pod {ns}/{pod['metadata']['name']}; Pod status: {phase}; Pod restart policy: "
                        f"{pod['spec'].get('restartPolicy', 'Always')}; Ray container terminated status: nil"
                        if pod in heads else f"Deleted Pod {ns}/{pod['metadata']['name']}")
                events.record(self.store, cluster, "RayCluster", f"Deleted{kind}Pod", note, COMPONENT)
        pods = [p for p in self.store.list("pods", ns, f"ray.io/cluster={name}") if not
                p["metadata"].get("deletionTimestamp")]
        if not [p for p in pods if p["metadata"]["labels"]["ray.io/node-type"] == "head"]:
            if created := self._create("pods", cluster, build_pod(cluster, cluster["spec"]["headGroupSpec"], "head")):
                events.record(self.store, cluster, "RayCluster", "CreatedHeadPod",
                              f"Created head Pod {ns}/{created['metadata']['name']}", COMPONENT)
        for group in cluster["spec"].get("workerGroupSpecs", []):
            mine = [p for p in pods if p["metadata"]["labels"].get("ray.io/group") == group["groupName"]
                    and p["metadata"]["labels"]["ray.io/node-type"] == "worker"]
            want = desired_workers(group)
            for extra in mine[want:]:
                self.store.delete("pods", ns, extra["metadata"]["name"])
                events.record(self.store, cluster, "RayCluster", "DeletedWorkerPod",
                              f"Deleted pod {ns}/{extra['metadata']['name']}", COMPONENT)
            for _ in range(want - len(mine)):
                if created := self._create("pods", cluster, build_pod(cluster, group, "worker")):
                    events.record(self.store, cluster, "RayCluster", "CreatedWorkerPod",
                                  f"Created worker Pod {ns}/{created['metadata']['name']}", COMPONENT)
        self._status(cluster)

    def _status(self, cluster: dict) -> None:
        """``calculateStatus``."""
        ns, name = cluster["metadata"]["namespace"], cluster["metadata"]["name"]
        try:
            cluster = self.store.get("rayclusters", ns, name)
        except ApiError:
            return
        pods = [p for p in self.store.list("pods", ns, f"ray.io/cluster={name}")
                if not p["metadata"].get("deletionTimestamp")]
        workers = [p for p in pods if p["metadata"]["labels"]["ray.io/node-type"] == "worker"]
        head = next((p for p in pods if p["metadata"]["labels"]["ray.io/node-type"] == "head"), None)
        desired = sum(desired_workers(g) for g in cluster["spec"].get("workerGroupSpecs", []))
        old = cluster.get("status", {})
        status = {**old, "desiredWorkerReplicas": desired,
                  "readyWorkerReplicas": sum(p.get("status", {}).get("phase") == "Running" and _ready(p) for p in workers),
                  "availableWorkerReplicas": sum(p.get("status", {}).get("phase") == "Running" for p in workers),
                  "lastUpdateTime": rfc3339()}
        if len(pods) == desired + 1 and all_running(pods) and old.get("state") != "ready":
            status["state"] = "ready"
            status.setdefault("stateTransitionTimes", {})["ready"] = rfc3339()
        provisioned = next((c for c in old.get("conditions", []) if c["type"] == "RayClusterProvisioned"), None)
        if provisioned is None or provisioned["status"] != "True":
            provisioned = {"type": "RayClusterProvisioned", "status": "True", "reason": "AllPodRunningAndReadyFirstTime",
                           "message": "All Ray Pods are ready for the first time"} if all_running(pods) else {
                "type": "RayClusterProvisioned", "status": "False", "reason": "RayClusterPodsProvisioning",
                "message": "RayCluster Pods are being provisioned for first time"}
        status["conditions"] = [_set_condition(old.get("conditions", []), c) for c in
                                (head_ready_condition(head), provisioned)]
        if head is not None:
            status["head"] = {"podName": head["metadata"]["name"], "podIP": head.get("status", {}).get("podIP", ""),
                              "serviceName": f"{name}-head-svc"}
        if {k: v for k, v in status.items() if k != "lastUpdateTime"} != \
                {k: v for k, v in old.items() if k != "lastUpdateTime"}:
            cluster["status"] = status
            try:
                self.store.update("rayclusters", ns, cluster, status_only=True)
            except ApiError:
                pass
