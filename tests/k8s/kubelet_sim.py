"""The kubelet of every node, and the Job controller, for the pods of the simulated cluster.

From kubernetes/kubernetes (research-issue20.md §2b): images (``pkg/kubelet/images/image_manager.go``: Pulling,
``ErrImagePull`` with the runtime's error, ``ImagePullBackOff`` "Back-off pulling image %q: ErrImagePull: <err>",
``InvalidImageName`` "Failed to apply default image tag %q: couldn't parse image name %q: invalid reference
format"); the environment (``kubelet_pods.go`` ``makeEnvironmentVariables``: envFrom, then env; a missing
Secret/ConfigMap is ``secret "X" not found`` / ``configmap "X" not found``, a missing key ``couldn't find key K in
Secret ns/X``; ``optional`` references are skipped), failing with ``CreateContainerConfigError`` and the event
``Failed`` "Error: <msg>" (``kuberuntime_container.go`` ``startContainer``); init containers one after another,
then the app containers; restarts with the back-off "back-off 10s restarting failed container=C pod=P_NS(UID)"
(``kuberuntime_manager.go`` ``doBackOff``: 10 s doubling to 5m0s) as ``CrashLoopBackOff``; the waiting reasons
``PodInitializing``/``ContainerCreating`` (``convertToAPIContainerStatuses``); readiness from the container's HTTP
readiness probe; the pod conditions ``Initialized``, ``ContainersReady``, ``Ready`` ("containers with unready
status: [c]", ``status/generate.go``). The Job controller (``pkg/controller/job``) runs one pod at a time and
retries failed pods up to ``backoffLimit`` (then ``Failed``/``BackoffLimitExceeded``).

What a container *does* is the runtime's (:class:`tests.k8s.runtime_sim.SimulatedRuntime`, or pods as hosts in
network namespaces, :mod:`tests.k8s.hosts`); ``backoff_scale`` shrinks the real back-off durations.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from tests.k8s import events
from tests.k8s.apiserver import ApiError, Store, rfc3339

# docker/distribution reference grammar (domain, path components, tag, digest), as containerd parses it
REFERENCE = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9-]+)*(?::\d+)?/)?"
                       r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
                       r"(?::\w[\w.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$")
BACKOFF_S, MAX_BACKOFF_S = 10, 300
COMPONENT = "kubelet"


class EnvError(Exception):
    """What ``makeEnvironmentVariables`` returns: the container is not created."""


class Runtime(Protocol):
    def sandbox(self, pod: dict) -> str: ...  # the pod's IP

    def release(self, uid: str) -> None: ...

    def start(self, pod: dict, container: dict, env: dict[str, str], log: Callable[[str], None]) -> Any: ...

    def exited(self, handle: Any) -> int | None: ...

    def kill(self, handle: Any) -> None: ...

    def probe(self, pod: dict, container: dict, handle: Any) -> bool: ...

    def pull(self, image: str) -> str | None: ...  # the runtime's error, or None when the image is there


def go_duration(seconds: int) -> str:
    minutes, secs = divmod(seconds, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _field_ref(pod: dict, path: str) -> str:
    if match := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
        return pod["metadata"].get(match.group(1), {}).get(match.group(2), "")
    values = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": pod["metadata"]["namespace"],
              "metadata.uid": pod["metadata"]["uid"], "spec.nodeName": pod["spec"].get("nodeName", ""),
              "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
              "status.podIP": pod.get("status", {}).get("podIP", "")}
    return values.get(path, "")


def environment(store: Store, pod: dict, container: dict) -> dict[str, str]:
    """``makeEnvironmentVariables``: the container's environment, or :class:`EnvError`."""
    ns, env = pod["metadata"]["namespace"], {}

    def source(kind: str, name: str, optional: bool) -> dict[str, str] | None:
        try:
            obj = store.get("secrets" if kind == "Secret" else "configmaps", ns, name)
        except ApiError:
            if optional:
                return None
            raise EnvError(f'{kind.lower()} "{name}" not found') from None
        if kind == "Secret":
            return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()} | \
                dict(obj.get("stringData") or {})
        return dict(obj.get("data") or {})

    for ref in container.get("envFrom", []):
        kind, spec = ("Secret", ref["secretRef"]) if "secretRef" in ref else ("ConfigMap", ref["configMapRef"])
        data = source(kind, spec["name"], spec.get("optional", False)) or {}
        env.update({ref.get("prefix", "") + k: v for k, v in data.items()})
    for var in container.get("env", []):
        if "valueFrom" not in var:
            env[var["name"]] = var.get("value", "")
            continue
        frm = var["valueFrom"]
        if "fieldRef" in frm:
            env[var["name"]] = _field_ref(pod, frm["fieldRef"]["fieldPath"])
            continue
        kind, ref = ("Secret", frm["secretKeyRef"]) if "secretKeyRef" in frm else ("ConfigMap", frm.get("configMapKeyRef"))
        if ref is None:
            continue
        data = source(kind, ref["name"], ref.get("optional", False))
        if data is None:
            continue
        if ref["key"] not in data:
            if ref.get("optional"):
                continue
            raise EnvError(f"couldn't find key {ref['key']} in {kind} {ns}/{ref['name']}")
        env[var["name"]] = data[ref["key"]]
    return env


@dataclass
class Box:
    """One container's life on its node."""

    handle: Any = None
    restarts: int = 0
    retry_at: float = 0.0  # monotonic time of the next start (back-off)
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last: dict = field(default_factory=dict)
    ready: bool = False
    done: bool = False  # an init container that succeeded
    pulls: int = 0


class Kubelet:
    """Runs the bound pods of every node through ``runtime``, one sync per :meth:`tick`."""

    def __init__(self, store: Store, runtime: Runtime, backoff_scale: float = 0.01):
        self.store, self.runtime, self.scale = store, runtime, backoff_scale
        self.boxes: dict[tuple[str, str], Box] = {}  # (pod uid, container) -> its state
        self.pods: dict[str, tuple[str, str]] = {}  # uid -> (namespace, name) of the pods it runs

    def tick(self) -> None:
        live = {p["metadata"]["uid"]: p for p in self.store.list("pods", None)}
        for uid in [u for u in self.pods if u not in live or live[u]["metadata"].get("deletionTimestamp")]:
            self._stop(uid)
        for uid, pod in live.items():
            if pod["spec"].get("nodeName") and not pod["metadata"].get("deletionTimestamp") and \
                    pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
                self.pods[uid] = (pod["metadata"]["namespace"], pod["metadata"]["name"])
                self.sync(pod)

    def _stop(self, uid: str) -> None:
        for (owner, _), box in list(self.boxes.items()):
            if owner == uid:
                if box.handle is not None:
                    self.runtime.kill(box.handle)
                del self.boxes[(owner, _)]
        self.runtime.release(uid)
        self.pods.pop(uid, None)

    def _event(self, pod: dict, reason: str, message: str, type_: str = "Normal") -> None:
        events.record(self.store, pod, "Pod", reason, message, COMPONENT, type_)

    def _start(self, pod: dict, container: dict, box: Box) -> bool:
        """Pull, make the environment, start; returns whether the container runs now."""
        image, name = container.get("image", ""), container["name"]
        if not REFERENCE.match(image):
            msg = f'Failed to apply default image tag "{image}": couldn\'t parse image name "{image}": invalid ' \
                  f"reference format"
            box.state = {"waiting": {"reason": "InvalidImageName", "message": msg}}
            self._event(pod, "InspectFailed", msg, "Warning")
            return False
        if error := self.runtime.pull(image):
            box.pulls += 1
            if box.pulls % 2 == 0:  # every other sync: backing off
                box.state = {"waiting": {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}": '
                                                                                  f"ErrImagePull: {error}"}}
                self._event(pod, "BackOff", f'Back-off pulling image "{image}"')
                return False
            self._event(pod, "Pulling", f'Pulling image "{image}"')
            self._event(pod, "Failed", f'Failed to pull image "{image}": {error}', "Warning")
            box.state = {"waiting": {"reason": "ErrImagePull", "message": error}}
            return False
        try:
            env = environment(self.store, pod, container)
        except EnvError as exc:
            box.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            self._event(pod, "Failed", f"Error: {exc}", "Warning")
            return False
        ns, pod_name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        box.handle = self.runtime.start(pod, container, env, lambda line: self.store.log(ns, pod_name, line))
        box.state = {"running": {"startedAt": rfc3339()}}
        self._event(pod, "Created", f"Created container: {name}")
        self._event(pod, "Started", f"Started container {name}")
        return True

    def _run(self, pod: dict, container: dict, box: Box, init: bool) -> None:
        """One sync of one container: start it, or notice it ended (restart with back-off)."""
        if box.done:
            return
        if box.handle is None:
            if time.monotonic() >= box.retry_at:
                self._start(pod, container, box)
            return
        code = self.runtime.exited(box.handle)
        if code is None:
            box.ready = not init and self.runtime.probe(pod, container, box.handle)
            return
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "finishedAt": rfc3339()}
        box.handle, box.ready, box.last = None, False, {"terminated": terminated}
        policy = pod["spec"].get("restartPolicy", "Always")
        if init and code == 0:
            box.done, box.state = True, {"terminated": terminated}
            return
        if policy == "Never" or (policy == "OnFailure" and code == 0):
            box.state, box.done = {"terminated": terminated}, True
            return
        delay = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** box.restarts)
        box.restarts += 1
        box.retry_at = time.monotonic() + delay * self.scale
        ns, name, uid = pod["metadata"]["namespace"], pod["metadata"]["name"], pod["metadata"]["uid"]
        box.state = {"waiting": {"reason": "CrashLoopBackOff", "message": f"back-off {go_duration(delay)} restarting "
                                 f"failed container={container['name']} pod={name}_{ns}({uid})"}}
        self._event(pod, "BackOff", f"Back-off restarting failed container {container['name']} in pod "
                    f"{name}_{ns}({uid})", "Warning")

    def sync(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        status = pod.setdefault("status", {})
        if not status.get("podIP"):
            status.update(podIP=self.runtime.sandbox(pod), hostIP=pod["spec"]["nodeName"], startTime=rfc3339())
        inits, apps = pod["spec"].get("initContainers", []), pod["spec"]["containers"]
        boxes = {c["name"]: self.boxes.setdefault((uid, c["name"]), Box()) for c in inits + apps}
        pending_init = next((c for c in inits if not boxes[c["name"]].done), None)
        if pending_init is not None:
            self._run(pod, pending_init, boxes[pending_init["name"]], init=True)
        if pending_init is None or boxes[pending_init["name"]].done:
            for container in apps:
                self._run(pod, container, boxes[container["name"]], init=False)
        else:
            for container in apps:
                boxes[container["name"]].state = {"waiting": {"reason": "PodInitializing"}}
        self._write_status(pod, inits, apps, boxes)

    def _write_status(self, pod: dict, inits: list, apps: list, boxes: dict[str, Box]) -> None:
        status = pod["status"]

        def entry(container: dict, box: Box) -> dict:
            image_id = f"{container.get('image', '')}@sha256:{'0' * 64}" if box.handle or box.last else ""
            out = {"name": container["name"], "image": container.get("image", ""), "imageID": image_id,
                   "ready": box.ready,
                   "restartCount": box.restarts, "started": "running" in box.state, "state": box.state}
            return {**out, "lastState": box.last} if box.last else out

        status["initContainerStatuses"] = [entry(c, boxes[c["name"]]) for c in inits]
        status["containerStatuses"] = [entry(c, boxes[c["name"]]) for c in apps]
        app_boxes = [boxes[c["name"]] for c in apps]
        initialized = all(boxes[c["name"]].done for c in inits)
        if all(b.done for b in app_boxes):
            codes = [b.state["terminated"]["exitCode"] for b in app_boxes]
            status["phase"] = "Succeeded" if not any(codes) else "Failed"
        elif initialized and any(b.handle is not None or b.restarts for b in app_boxes):
            status["phase"] = "Running"
        else:
            status["phase"] = "Pending"
        unready = [c["name"] for c in apps if not boxes[c["name"]].ready]
        conditions = [c for c in status.get("conditions", []) if c["type"] == "PodScheduled"]
        if initialized:
            conditions.append({"type": "Initialized", "status": "True"})
        else:
            conditions.append({"type": "Initialized", "status": "False", "reason": "ContainersNotInitialized",
                               "message": f"containers with incomplete status: "
                                          f"[{' '.join(c['name'] for c in inits if not boxes[c['name']].done)}]"})
        for kind in ("ContainersReady", "Ready"):
            conditions.append({"type": kind, "status": "True"} if not unready else {
                "type": kind, "status": "False", "reason": "ContainersNotReady",
                "message": f"containers with unready status: [{' '.join(unready)}]"})
        status["conditions"] = conditions
        try:
            current = self.store.get("pods", pod["metadata"]["namespace"], pod["metadata"]["name"])
        except ApiError:
            return
        if current.get("status") != status:
            current["status"] = status
            try:
                self.store.update("pods", pod["metadata"]["namespace"], current, status_only=True)
            except ApiError:
                pass


def job_controller(store: Store) -> None:
    """``pkg/controller/job``, for the RayJob's submitter: one pod at a time (``parallelism`` 1), a failed pod
    replaced until ``backoffLimit`` failures, then ``Failed``/``BackoffLimitExceeded``; a succeeded pod
    completes the Job."""
    for job in store.list("jobs", None):
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        if job["metadata"].get("deletionTimestamp") or any(
                c["status"] == "True" for c in job.get("status", {}).get("conditions", [])):
            continue
        pods = store.list("pods", ns, f"job-name={name}")
        failed = sum(p.get("status", {}).get("phase") == "Failed" for p in pods)
        succeeded = any(p.get("status", {}).get("phase") == "Succeeded" for p in pods)
        condition = None
        if succeeded:
            condition = {"type": "Complete", "status": "True", "lastTransitionTime": rfc3339()}
        elif failed > job["spec"].get("backoffLimit", 6):
            condition = {"type": "Failed", "status": "True", "lastTransitionTime": rfc3339(),
                         "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}
        if condition is not None:
            job["status"] = {"conditions": [condition], "succeeded" if succeeded else "failed": 1 if succeeded else failed}
            try:
                store.update("jobs", ns, job, status_only=True)
            except ApiError:
                pass
            continue
        if not [p for p in pods if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]:
            template = job["spec"]["template"]
            labels = {**(template.get("metadata", {}).get("labels") or {}), "job-name": name,
                      "batch.kubernetes.io/job-name": name, "controller-uid": job["metadata"]["uid"]}
            store.create("pods", ns, {"apiVersion": "v1", "kind": "Pod", "metadata": {
                "generateName": f"{name}-", "labels": labels, "ownerReferences": [{
                    "apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job["metadata"]["uid"],
                    "controller": True, "blockOwnerDeletion": True}]}, "spec": template["spec"]})
