"""``loomcfm cluster check``: what a first run needs from the cluster, asked of the live API in seconds.

Each check is a row of the table the command prints, ✓ or ✗, with the one-line fix of a ✗:

* KubeRay's CRDs are served at ``ray.io/v1`` and declare every field (and enum value) the rendered RayJob
  uses (:mod:`loomcfm_core.kube.crd`);
* the operator's Deployment (``kube.operator``) is available;
* the namespace exists and is not terminating;
* this identity may do what the launcher does there (one SelfSubjectAccessReview per request of
  :data:`loomcfm_core.kube.platform.LAUNCHER_ACCESS`; run as a pipeline step, that is the step's
  ServiceAccount);
* every Secret and ConfigMap the manifests and the RayJob reference (non-optional), with the keys read from
  them, in the RayJob's namespace; and those the KFP steps read, in KFP's namespace;
* the nodes can hold the RayCluster's head and workers (:mod:`loomcfm_core.kube.capacity`).

Reading CRDs, the operator's Deployment, namespaces and nodes is cluster-wide: ``k8s/base/rbac.yaml`` grants
it (read-only, by name where it can) to the pipeline's ServiceAccounts as the ClusterRole ``loomcfm-preflight``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from loomcfm_core.kube.capacity import fit, shapes
from loomcfm_core.kube.client import REQUEST_TIMEOUT, KubeApi, describe, status_code
from loomcfm_core.kube.crd import served_schema, unsupported
from loomcfm_core.kube.platform import CRDS, LAUNCHER_ACCESS

CRD_FIX = ("install or upgrade KubeRay's CRDs (helm does not upgrade them): kubectl apply --server-side -k "
           "'github.com/ray-project/kuberay/ray-operator/config/crd?ref=v1.7.0'")
RBAC_FIX = "kubectl apply -k k8s/overlays/<cpu|gpu> (k8s/base/rbac.yaml: Role loomcfm-rayjob-launcher, ClusterRole " \
           "loomcfm-preflight) and bind them to this ServiceAccount"


@dataclass(frozen=True)
class Check:
    """One row: ``ok``, what was found, and for a failure the one-line fix."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def table(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for check in checks:
        lines.append(f"{'✓' if check.ok else '✗'} {check.name.ljust(width)}  {check.detail}")
        if not check.ok and check.fix:
            lines.append(f"  {' ' * width}  fix: {check.fix}")
    return "\n".join(lines)


def _apis(api: KubeApi):
    from kubernetes import client

    return client.ApiextensionsV1Api(api.core.api_client), client.AppsV1Api(api.core.api_client), \
        client.AuthorizationV1Api(api.core.api_client)


def _denied(what: str, exc: Exception) -> Check:
    return Check(what, False, f"cannot read: {describe(exc)}", RBAC_FIX)


def crds(api: KubeApi, rayjob: dict) -> list[Check]:
    from kubernetes.client.exceptions import ApiException

    extensions, _, _ = _apis(api)
    out = []
    for name in CRDS:
        try:
            raw = extensions.read_custom_resource_definition(name, _request_timeout=REQUEST_TIMEOUT,
                                                             _preload_content=False)
        except ApiException as exc:
            if status_code(exc) == 404:
                out.append(Check(f"CRD {name}", False, "not installed", CRD_FIX))
            else:
                out.append(_denied(f"CRD {name}", exc))
            continue
        schema = served_schema(json.loads(raw.data), "v1")  # the schema as served, in its own field names
        if schema is None:
            out.append(Check(f"CRD {name}", False, "does not serve version v1", CRD_FIX))
        elif name == "rayjobs.ray.io" and (missing := unsupported(rayjob, schema)):
            out.append(Check(f"CRD {name}", False, f"too old for the RayJob: no {', '.join(missing[:4])}"
                             f"{' ...' if len(missing) > 4 else ''}", CRD_FIX))
        else:
            out.append(Check(f"CRD {name}", True, "v1 served" + (", declares every field the RayJob uses"
                                                                 if name == "rayjobs.ray.io" else "")))
    return out


def operator(api: KubeApi, where: str) -> Check:
    from kubernetes.client.exceptions import ApiException

    namespace, _, name = where.partition("/")
    _, apps, _ = _apis(api)
    fix = (f"helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0 --namespace {namespace} "
           f"--create-namespace, or set kube.operator=<namespace>/<deployment>")
    try:
        deployment = apps.read_namespaced_deployment(name, namespace, _request_timeout=REQUEST_TIMEOUT)
    except ApiException as exc:
        if status_code(exc) == 404:
            return Check("KubeRay operator", False, f"no Deployment {where}", fix)
        return _denied("KubeRay operator", exc)
    available = deployment.status.available_replicas or 0
    if available < 1:
        return Check("KubeRay operator", False, f"{where}: 0 of {deployment.spec.replicas} replicas available",
                     f"kubectl -n {namespace} describe deployment {name}")
    image = deployment.spec.template.spec.containers[0].image if deployment.spec.template else ""
    return Check("KubeRay operator", True, f"{where}: {available} available" + (f", {image}" if image else ""))


def namespace(api: KubeApi, name: str, overlay_fix: str) -> Check:
    from kubernetes.client.exceptions import ApiException

    try:
        found = api.core.read_namespace(name, _request_timeout=REQUEST_TIMEOUT)
    except ApiException as exc:
        if status_code(exc) == 404:
            return Check(f"namespace {name}", False, "does not exist", overlay_fix)
        return _denied(f"namespace {name}", exc)
    if found.status and found.status.phase == "Terminating":
        return Check(f"namespace {name}", False, "is being deleted", f"wait for it to go, then {overlay_fix}")
    return Check(f"namespace {name}", True, "exists")


def access(api: KubeApi, ns: str) -> Check:
    """One SelfSubjectAccessReview per request the launcher makes in ``ns``."""
    from kubernetes import client

    _, _, authz = _apis(api)
    refused = []
    for need in LAUNCHER_ACCESS:
        review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(namespace=ns, verb=need.verb, group=need.group,
                                                            resource=need.resource, subresource=need.subresource)))
        answer = authz.create_self_subject_access_review(review, _request_timeout=REQUEST_TIMEOUT)
        if not answer.status.allowed:
            refused.append(f"{need.text()} ({need.why})")
    if refused:
        return Check("launcher permissions", False, f"in {ns} this identity may not: {'; '.join(refused)}", RBAC_FIX)
    return Check("launcher permissions", True, f"in {ns}: {', '.join(n.text() for n in LAUNCHER_ACCESS)}")


def references(api: KubeApi, ns: str, needed: dict[tuple[str, str], set[str]], fixes: dict[str, str]) -> list[Check]:
    """Each Secret/ConfigMap of ``needed`` ((kind, name) -> keys read) exists in ``ns`` with those keys."""
    from kubernetes.client.exceptions import ApiException

    out = []
    for (kind, name), keys in sorted(needed.items()):
        label = f"{kind} {ns}/{name}"
        read = api.core.read_namespaced_secret if kind == "Secret" else api.core.read_namespaced_config_map
        try:
            obj = read(name, ns, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if status_code(exc) == 404:
                out.append(Check(label, False, "not found", fixes[f"{kind}/{name}"]))
            else:
                out.append(_denied(label, exc))
            continue
        have = set(obj.data or {}) | set(getattr(obj, "string_data", None) or {})
        missing = sorted(keys - have)
        if missing:
            out.append(Check(label, False, f"lacks the key(s) {', '.join(missing)}", fixes[f"{kind}/{name}"]))
        else:
            out.append(Check(label, True, f"keys {', '.join(sorted(keys))}" if keys else "exists"))
    return out


def nodes(api: KubeApi, rayjob: dict) -> Check:
    from kubernetes.client.exceptions import ApiException

    try:
        items = api.core.list_node(_request_timeout=REQUEST_TIMEOUT).items
    except ApiException as exc:
        return _denied("nodes", exc)
    pods = shapes(rayjob)
    placed, problem = fit(pods, items)
    if problem:
        return Check("nodes", False, problem, "add nodes that fit, or change kube.ray_workers, kube.gpus_per_worker, "
                     "kube.worker_cpu, kube.worker_memory or kube.gpu_node_selector")
    where = sorted(set(placed.values()))
    return Check("nodes", True, f"{len(pods)} pods ({', '.join(sorted({p.text() for p in pods}))}) fit on "
                               f"{', '.join(where)}")
