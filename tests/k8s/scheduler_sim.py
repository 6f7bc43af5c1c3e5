"""kube-scheduler's default profile as far as our pods meet it: nodes, taints, selectors and resources, with
the scheduler's own messages.

Built from kubernetes/kubernetes (index commit 00fdf757a8e8, research-issue20.md §2a):

* the filter plugins in the default profile's order, a node's status being its first failing plugin's
  (``pkg/scheduler/framework/runtime/framework.go`` ``RunFilterPlugins``): NodeUnschedulable ("node(s) were
  unschedulable"), TaintToleration (``plugins/tainttoleration`` ``Filter``: "node(s) had untolerated taint
  {key: value}", NoSchedule/NoExecute only, UnschedulableAndUnresolvable), NodeAffinity for ``nodeSelector``
  ("node(s) didn't match Pod's node affinity/selector"), NodeResourcesFit (``plugins/noderesources/fit.go``
  ``fitsRequest``: "Too many pods", "Insufficient cpu", "Insufficient memory", "Insufficient <resource>",
  every insufficient resource of the node; unresolvable when the request exceeds the node's allocatable);
* a pod's request: the sum of its containers', or its largest init container's if that is more
  (``resource.PodRequests``); a container with limits and no requests requests its limits (API defaulting);
* ``framework/types.go`` ``(*FitError).Error``: ``0/N nodes are available: <"count reason", sorted as strings,
  ", "-joined>.`` then DefaultPreemption's ``preemption: 0/N nodes are available: ...`` where unresolvable
  nodes are "Preemption is not helpful for scheduling" and the others "No preemption victims found for
  incoming pod" (every pod here has the same priority, so none is a victim);
* ``schedule_one.go`` ``handleSchedulingFailure``: Warning ``FailedScheduling`` from ``default-scheduler``,
  ``PodScheduled=False`` with reason ``Unschedulable``; a fit binds the pod to the feasible node with the most
  free CPU and memory (NodeResourcesFit's default LeastAllocated score) and records ``Scheduled``.
"""

from __future__ import annotations

import collections
from decimal import Decimal

from loomcfm_core.kube.settings import parse_quantity
from tests.k8s import events
from tests.k8s.apiserver import Store, rfc3339

TERMINAL = ("Succeeded", "Failed")
UNRESOLVABLE, UNSCHEDULABLE = "UnschedulableAndUnresolvable", "Unschedulable"


def node(name: str, cpu: str = "16", memory: str = "64Gi", gpus: int = 0, labels: dict | None = None,
         taints: list[dict] | None = None, pods: int = 110) -> dict:
    """A Node object as the kubelet registers it (allocatable = capacity here)."""
    allocatable = {"cpu": cpu, "memory": memory, "pods": str(pods)}
    if gpus:
        allocatable["nvidia.com/gpu"] = str(gpus)
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {
        "kubernetes.io/hostname": name, **(labels or {})}}, "spec": {"taints": taints or []},
        "status": {"allocatable": allocatable, "capacity": dict(allocatable)}}


def _container_requests(container: dict) -> dict[str, Decimal]:
    resources = container.get("resources") or {}
    amounts = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
    return {name: parse_quantity(str(value)) for name, value in amounts.items()}


def pod_requests(pod: dict) -> dict[str, Decimal]:
    total: dict[str, Decimal] = collections.defaultdict(Decimal)
    for container in pod["spec"].get("containers", []):
        for name, value in _container_requests(container).items():
            total[name] += value
    for init in pod["spec"].get("initContainers", []):
        for name, value in _container_requests(init).items():
            total[name] = max(total[name], value)
    total["pods"] = Decimal(1)
    return dict(total)


def tolerates(tolerations: list[dict], taint: dict) -> bool:
    """``Toleration.ToleratesTaint``."""
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator", "Equal") == "Exists":
            if not t.get("key") or t["key"] == taint["key"]:
                return True
        elif t.get("key") == taint["key"] and t.get("value", "") == taint.get("value", ""):
            return True
    return False


def _filter(pod: dict, node_obj: dict, used: dict[str, Decimal]) -> tuple[str, list[str]] | None:
    """The first failing plugin's (code, reasons) for ``pod`` on ``node_obj``, or None when it fits."""
    spec, tolerations = node_obj.get("spec") or {}, pod["spec"].get("tolerations") or []
    if spec.get("unschedulable") and not tolerates(tolerations, {"key": "node.kubernetes.io/unschedulable",
                                                                "effect": "NoSchedule"}):
        return UNRESOLVABLE, ["node(s) were unschedulable"]
    for taint in spec.get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(tolerations, taint):
            return UNRESOLVABLE, [f"node(s) had untolerated taint {{{taint['key']}: {taint.get('value', '')}}}"]
    labels = node_obj["metadata"].get("labels") or {}
    if any(labels.get(k) != v for k, v in (pod["spec"].get("nodeSelector") or {}).items()):
        return UNRESOLVABLE, ["node(s) didn't match Pod's node affinity/selector"]
    allocatable = {k: parse_quantity(str(v)) for k, v in node_obj["status"]["allocatable"].items()}
    reasons, unresolvable = [], False
    for name, amount in pod_requests(pod).items():
        if amount <= 0:
            continue
        have = allocatable.get(name, Decimal(0))
        if amount + used.get(name, Decimal(0)) > have:
            reasons.append("Too many pods" if name == "pods" else f"Insufficient {name}")
            unresolvable |= amount > have
    if reasons:
        return (UNRESOLVABLE if unresolvable else UNSCHEDULABLE), reasons
    return None


def _histogram(counts: collections.Counter) -> str:
    return ", ".join(sorted(f"{count} {reason}" for reason, count in counts.items()))


def fit_error(statuses: dict[str, tuple[str, list[str]]]) -> str:
    n = len(statuses)
    filters = collections.Counter(r for _, reasons in statuses.values() for r in reasons)
    preemption = collections.Counter("Preemption is not helpful for scheduling" if code == UNRESOLVABLE else
                                     "No preemption victims found for incoming pod" for code, _ in statuses.values())
    return (f"0/{n} nodes are available: {_histogram(filters)}. preemption: 0/{n} nodes are available: "
            f"{_histogram(preemption)}.")


def _used(store: Store) -> dict[str, dict[str, Decimal]]:
    used: dict[str, dict[str, Decimal]] = collections.defaultdict(lambda: collections.defaultdict(Decimal))
    for pod in store.list("pods", None):
        where = pod["spec"].get("nodeName")
        if where and pod.get("status", {}).get("phase") not in TERMINAL:
            for name, amount in pod_requests(pod).items():
                used[where][name] += amount
    return used


def _condition(pod: dict, status: str, reason: str = "", message: str = "") -> None:
    conditions = [c for c in pod.setdefault("status", {}).get("conditions", []) if c["type"] != "PodScheduled"]
    condition = {"type": "PodScheduled", "status": status, "lastTransitionTime": rfc3339()}
    condition.update({k: v for k, v in (("reason", reason), ("message", message)) if v})
    pod["status"]["conditions"] = [condition, *conditions]
    pod["status"].setdefault("phase", "Pending")


def schedule(store: Store) -> None:
    """One scheduling round: every unbound, live pod is bound or marked Unschedulable."""
    nodes = store.list("nodes", "")
    for pod in store.list("pods", None):
        if pod["spec"].get("nodeName") or pod["metadata"].get("deletionTimestamp"):
            continue
        used = _used(store)
        statuses = {n["metadata"]["name"]: _filter(pod, n, used[n["metadata"]["name"]]) for n in nodes}
        feasible = [n for n in nodes if statuses[n["metadata"]["name"]] is None]
        ns = pod["metadata"]["namespace"]
        if not feasible:
            message = fit_error(statuses) if nodes else "no nodes available to schedule pods"
            _condition(pod, "False", UNSCHEDULABLE, message)
            store.update("pods", ns, pod, status_only=True)
            events.record(store, pod, "Pod", "FailedScheduling", message, "default-scheduler", "Warning")
            continue

        def free(n: dict) -> Decimal:
            have = {k: parse_quantity(str(v)) for k, v in n["status"]["allocatable"].items()}
            took = used[n["metadata"]["name"]]
            return min((have[r] - took[r]) / have[r] for r in ("cpu", "memory") if have.get(r))

        target = sorted(feasible, key=lambda n: (-free(n), n["metadata"]["name"]))[0]["metadata"]["name"]
        pod["spec"]["nodeName"] = target
        store.update("pods", ns, pod)
        pod = store.get("pods", ns, pod["metadata"]["name"])
        _condition(pod, "True")
        store.update("pods", ns, pod, status_only=True)
        events.record(store, pod, "Pod", "Scheduled", f"Successfully assigned {ns}/{pod['metadata']['name']} to "
                      f"{target}", "default-scheduler")
