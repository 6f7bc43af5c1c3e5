"""Whether a cluster's nodes can hold a RayJob's pods: their requests, node selector and tolerations against
each node's allocatable resources, labels and taints.

The rules are the scheduler's filters as a user meets them (``node.spec.unschedulable``; NoSchedule and
NoExecute taints a pod must tolerate; ``nodeSelector`` labels; requests within ``status.allocatable``, a
container without requests requesting its limits); the pods are then packed onto the nodes first-fit, largest
first, against allocatable alone. Pods of other workloads are not counted: this says whether the cluster
*can* hold the RayCluster, not whether it has room right now (the launcher reports that from the scheduler).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from decimal import Decimal

from loomcfm_core.kube.settings import parse_quantity


@dataclass(frozen=True)
class PodShape:
    role: str
    requests: dict[str, Decimal]
    selector: dict[str, str]
    tolerations: tuple[dict, ...]

    def text(self) -> str:
        amounts = ", ".join(f"{k} {_show(k, v)}" for k, v in sorted(self.requests.items()))
        return f"{self.role} ({amounts})"


def _show(name: str, value: Decimal) -> str:
    if name == "memory" and value >= 2**30:
        return f"{value / 2**30:g}Gi"
    return f"{value.normalize():f}"


def shapes(rayjob: dict) -> list[PodShape]:
    """One :class:`PodShape` per pod of the RayJob's cluster: the head, then each worker replica."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = [("head", cluster["headGroupSpec"], 1)]
    groups += [(f"worker ({g['groupName']})", g, g.get("replicas", 1)) for g in cluster.get("workerGroupSpecs", [])]
    out = []
    for role, group, count in groups:
        spec = group["template"]["spec"]
        requests: dict[str, Decimal] = collections.defaultdict(Decimal)
        for container in spec["containers"]:
            resources = container.get("resources") or {}
            for name, value in {**(resources.get("limits") or {}), **(resources.get("requests") or {})}.items():
                requests[name] += parse_quantity(str(value))
        shape = PodShape(role, dict(requests), dict(spec.get("nodeSelector") or {}),
                         tuple(spec.get("tolerations") or []))
        out += [shape] * count
    return out


def _tolerated(tolerations: tuple[dict, ...], taint: dict) -> bool:
    for toleration in tolerations:
        if toleration.get("effect") not in (None, "", taint.get("effect")):
            continue
        key_ok = not toleration.get("key") or toleration.get("key") == taint.get("key")
        if toleration.get("operator") == "Exists" and key_ok:
            return True
        if toleration.get("key") == taint.get("key") and toleration.get("value", "") == taint.get("value", ""):
            return True
    return False


def _allocatable(node) -> dict[str, Decimal]:
    return {k: parse_quantity(str(v)) for k, v in (node.status.allocatable or {}).items()}


def refusal(shape: PodShape, node) -> str | None:
    """Why ``node`` can never hold a pod of ``shape`` (None: it can, when empty)."""
    if node.spec and node.spec.unschedulable:
        return "node(s) cordoned (spec.unschedulable)"
    for taint in (node.spec.taints or []) if node.spec else []:
        as_dict = {"key": taint.key, "value": taint.value or "", "effect": taint.effect}
        if taint.effect in ("NoSchedule", "NoExecute") and not _tolerated(shape.tolerations, as_dict):
            return f"node(s) had untolerated taint {{{taint.key}: {taint.value or ''}}}"
    labels = node.metadata.labels or {}
    missing = [f"{k}={v}" for k, v in shape.selector.items() if labels.get(k) != v]
    if missing:
        return f"node(s) lack the label {', '.join(missing)}"
    have = _allocatable(node)
    short = [name for name, amount in sorted(shape.requests.items()) if amount > have.get(name, Decimal(0))]
    return f"Insufficient {', '.join(short)}" if short else None


def fit(pods: list[PodShape], nodes: list) -> tuple[dict[str, str], str | None]:
    """Where each pod would go (pod label -> node), or why not: the first pod no node can hold, with the
    nodes' reasons counted as the scheduler counts them; or that together they do not fit."""
    free = {n.metadata.name: _allocatable(n) for n in nodes}
    placed: dict[str, str] = {}
    order = sorted(enumerate(pods), key=lambda p: (-p[1].requests.get("nvidia.com/gpu", 0),
                                                   -p[1].requests.get("cpu", 0)))
    for index, shape in order:
        usable = [n for n in nodes if refusal(shape, n) is None]
        if not usable:
            reasons = collections.Counter(refusal(shape, n) for n in nodes)
            counted = ", ".join(sorted(f"{count} {reason}" for reason, count in reasons.items()))
            return placed, f"no node can hold the {shape.text()} pod: 0/{len(nodes)} nodes: {counted or 'no nodes'}"
        target = next((n.metadata.name for n in usable if all(
            free[n.metadata.name].get(k, Decimal(0)) >= v for k, v in shape.requests.items())), None)
        if target is None:
            return placed, (f"each pod fits a node, but not all {len(pods)} at once: the {shape.text()} pod #{index} "
                            f"finds no room left on {', '.join(n.metadata.name for n in usable)}")
        for k, v in shape.requests.items():
            free[target][k] = free[target].get(k, Decimal(0)) - v
        placed[f"{shape.role} #{index}"] = target
    return placed, None
