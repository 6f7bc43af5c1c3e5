"""The pods below a RayJob while its Ray job is not running yet: what they wait for, and the causes that will
not go away by waiting.

KubeRay v1.7.0 starts the Ray job only once every pod of the RayCluster is Running and Ready
(``raycluster_controller.go`` ``calculateStatus``, ``utils.CheckAllPodsRunning``) and the submitter pod has
submitted it; until then the RayJob says ``Initializing`` (or ``Running`` without a ``jobStatus``) and nothing
else. The reasons are in the pods (``ray.io/cluster=<cluster>``; the submitter ``job-name=<rayjob>``) and their
events, as the scheduler and the kubelet write them:

* deterministic (the kubelet retries, nothing changes until someone acts): ``ErrImagePull``,
  ``ImagePullBackOff``, ``InvalidImageName``, ``ErrImageNeverPull`` (``pkg/kubelet/images/types.go``),
  ``CreateContainerConfigError`` (a missing Secret, ConfigMap or key), ``CreateContainerError``,
  ``RunContainerError``, and ``CrashLoopBackOff`` of a container that is not Ready;
* waiting: ``Unschedulable`` (``PodScheduled=False``; a cluster autoscaler may add a node), init containers
  (``wait-gcs-ready`` waits for the head), ``ContainerCreating``/``PodInitializing``, readiness probes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from loomcfm_core.kube.client import REQUEST_TIMEOUT, KubeApi, describe, status_code

# the kubelet's waiting reasons that do not clear by waiting, by what they are about (the kubelet alternates
# ErrImagePull and ImagePullBackOff: one cause)
KINDS = {"ErrImagePull": "image", "ImagePullBackOff": "image", "InvalidImageName": "image",
         "ErrImageNeverPull": "image", "CreateContainerConfigError": "config", "CreateContainerError": "config",
         "RunContainerError": "config", "CrashLoopBackOff": "crash"}
DETERMINISTIC = tuple(KINDS)
PROGRESS_S = 30.0
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cause:
    """Why a pod does not run (or is not Ready), as the kubelet or the scheduler says it."""

    pod: str
    role: str  # head, worker or submitter
    container: str
    reason: str
    message: str

    @property
    def deterministic(self) -> bool:
        return self.reason in DETERMINISTIC

    @property
    def key(self) -> tuple[str, str, str]:
        return self.pod, self.container, KINDS.get(self.reason, self.reason)

    def kubectl(self, namespace: str) -> str:
        """The command that shows more."""
        if self.reason == "CrashLoopBackOff":
            return f"kubectl -n {namespace} logs {self.pod} -c {self.container} --previous"
        return f"kubectl -n {namespace} describe pod {self.pod}"

    def line(self) -> str:
        where = f"{self.role} pod {self.pod}" + (f" container {self.container}" if self.container else "")
        return f"{where}: {self.reason}: {self.message}".rstrip(": ")


def _role(pod) -> str:
    labels = pod.metadata.labels or {}
    return labels.get("ray.io/node-type") or ("submitter" if "job-name" in labels else "pod")


def _ready(pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def cause_of(pod) -> Cause | None:
    """The first container (init containers first) that waits for a reason, a crash, or the scheduler's
    verdict; None for a pod that runs and is Ready, or is only starting."""
    name, role = pod.metadata.name, _role(pod)
    if pod.status is None:
        return None
    for status in [*(pod.status.init_container_statuses or []), *(pod.status.container_statuses or [])]:
        waiting = status.state.waiting if status.state else None
        if waiting is not None and waiting.reason in DETERMINISTIC:
            message = waiting.message or ""
            last = status.last_state.terminated if status.last_state else None
            if waiting.reason == "CrashLoopBackOff" and last is not None:
                message = f"exit code {last.exit_code} ({last.reason}), restarted {status.restart_count} times; {message}"
            return Cause(name, role, status.name, waiting.reason, message)
    for condition in pod.status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False":
            return Cause(name, role, "", condition.reason or "Unschedulable", condition.message or "")
    return None


def _describe(pod, cause: Cause | None) -> str:
    if cause is not None:
        return f"{pod.metadata.name} {pod.status.phase}: {cause.reason}: {cause.message}".rstrip(": ")
    waiting = next((s.state.waiting.reason for s in [*(pod.status.init_container_statuses or []),
                                                      *(pod.status.container_statuses or [])]
                    if s.state and s.state.waiting and s.state.waiting.reason), "")
    return f"{pod.metadata.name} {pod.status.phase}" + (f": {waiting}" if waiting else ", not Ready")


def summary(pods: list, workers: int, warnings: dict[str, str]) -> str:
    """``head Running, workers 1/2 Ready; <pod> Pending: <why>; ...`` (pods that are not Running and Ready)."""
    heads = [p for p in pods if _role(p) == "head"]
    worker_pods = [p for p in pods if _role(p) == "worker"]
    head = f"head {heads[0].status.phase}{'' if _ready(heads[0]) else ' (not Ready)'}" if heads else "no head pod"
    ready = sum(p.status.phase == "Running" and _ready(p) for p in worker_pods)
    parts = [f"{head}, workers {ready}/{workers} Ready"]
    for pod in pods:
        if not (pod.status.phase in ("Running", "Succeeded") and _ready(pod)):
            text = _describe(pod, cause_of(pod))
            if pod.metadata.name in warnings and cause_of(pod) is None:
                text += f" ({warnings[pod.metadata.name]})"
            parts.append(text)
    return "; ".join(parts)


class PodWatch:
    """Reads the pods of one RayJob attempt while its Ray job is not running, logs their progress at most every
    ``progress_s`` and returns a deterministic :class:`Cause` once it has lasted ``fail_fast_s``."""

    def __init__(self, api: KubeApi, rayjob: str, fail_fast_s: float, progress_s: float = PROGRESS_S,
                 clock=time.monotonic):
        self.api, self.rayjob, self.fail_fast_s, self.progress_s = api, rayjob, fail_fast_s, progress_s
        self.clock = clock
        self.first_seen: dict[tuple[str, str, str], float] = {}
        self.warned: set[tuple[str, str, str]] = set()
        self.last_log, self.last_text = -float("inf"), ""
        self.enabled, self.events_enabled = True, True
        self.said_unschedulable = False

    def _list(self, selector: str) -> list:
        return self.api.core.list_namespaced_pod(self.api.namespace, label_selector=selector,
                                                 _request_timeout=REQUEST_TIMEOUT).items

    def _warnings(self, names: set[str]) -> dict[str, str]:
        """The latest Warning event about each of ``names`` (pods, the RayCluster)."""
        from kubernetes.client.exceptions import ApiException

        if not self.events_enabled:
            return {}
        try:
            items = self.api.core.list_namespaced_event(self.api.namespace, field_selector="type=Warning",
                                                        _request_timeout=REQUEST_TIMEOUT).items
        except ApiException as exc:
            if status_code(exc) in (401, 403):
                self.events_enabled = False
                log.warning("not reading events of RayJob %s: %s (the launcher needs events list in namespace %s)",
                            self.rayjob, describe(exc), self.api.namespace)
            return {}
        latest: dict[str, tuple[str, str]] = {}
        for event in items:
            name = event.involved_object.name
            stamp = str(event.last_timestamp or event.event_time or "")
            if name in names and stamp >= latest.get(name, ("", ""))[0]:
                latest[name] = (stamp, f"{event.reason}: {event.message}")
        return {name: text for name, (_, text) in latest.items()}

    def check(self, cluster: str, workers: int) -> Cause | None:
        """One look at the pods of ``cluster`` and the submitter; the cause that ends the wait, if any."""
        from kubernetes.client.exceptions import ApiException

        if not self.enabled or not cluster:
            return None
        try:
            pods = [*self._list(f"ray.io/cluster={cluster}"), *self._list(f"job-name={self.rayjob}")]
        except ApiException as exc:
            if status_code(exc) in (401, 403):
                self.enabled = False
                log.warning("not watching the pods of RayJob %s: %s (the launcher needs pods list in namespace %s)",
                            self.rayjob, describe(exc), self.api.namespace)
            return None
        except OSError:
            return None
        now = self.clock()
        causes = [c for c in map(cause_of, pods) if c is not None]
        current = {c.key for c in causes if c.deterministic}
        self.first_seen = {k: v for k, v in self.first_seen.items() if k in current}
        for key in current:
            self.first_seen.setdefault(key, now)
        self._progress(pods, workers, causes, cluster, now)
        for cause in causes:
            if cause.deterministic and now - self.first_seen[cause.key] >= self.fail_fast_s:
                return cause
        return None

    def _progress(self, pods: list, workers: int, causes: list[Cause], cluster: str, now: float) -> None:
        if now - self.last_log < self.progress_s:
            return
        warnings = self._warnings({p.metadata.name for p in pods} | {cluster})
        text = summary(pods, workers, warnings)
        if cluster in warnings:
            text += f"; RayCluster {cluster}: {warnings[cluster]}"
        if text == self.last_text:
            return
        self.last_log, self.last_text = now, text
        log.info("RayJob %s: %s", self.rayjob, text)
        if any(c.reason == "Unschedulable" for c in causes) and not self.said_unschedulable:
            self.said_unschedulable = True
            log.warning("RayJob %s: a pod cannot be scheduled yet; waiting (a cluster autoscaler may add a node; "
                        "kube.pre_running_deadline_s ends the attempt)", self.rayjob)
        for cause in causes:
            if cause.deterministic and cause.key not in self.warned:
                self.warned.add(cause.key)
                left = self.fail_fast_s - (now - self.first_seen[cause.key])
                log.warning("RayJob %s: %s; failing in %.0f s unless it clears (kube.fail_fast_s)", self.rayjob,
                            cause.line(), max(0.0, left))
