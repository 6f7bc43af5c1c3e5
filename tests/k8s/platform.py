"""A simulated cluster set up the way the README's "First run on a cluster" says: KubeRay's CRDs and operator,
``kubectl apply -k k8s/overlays/...`` (namespace, ServiceAccounts, the Role and its bindings, the ConfigMaps),
and the Secrets created from ``k8s/base/*-credentials.example.yaml`` in our namespace and in KFP's.

Each piece can be left out, so a test can show what ``loomcfm cluster check`` and the launcher say when it is
missing. Objects rendered for namespace ``loomcfm`` are moved to the test's namespace the way kustomize's
namespace transformer would (metadata and ServiceAccount subjects).
"""

from __future__ import annotations

import base64
import copy
import functools
import secrets as random_secrets

import yaml

from tests.k8s.apiserver import SCHEMAS, Store
from tests.k8s.objects import K8S, NAMESPACE, render
from tests.k8s.rbac import service_account

OPERATOR = ("kuberay-system", "kuberay-operator")  # helm install kuberay-operator --namespace kuberay-system
KFP_NAMESPACE = "kubeflow"
RUNNER = (KFP_NAMESPACE, "pipeline-runner")  # the service account standalone KFP runs its steps as


def example_secret(name: str, namespace: str, values: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> dict:
    """The Secret ``name`` as its example file shapes it, every placeholder filled (``values`` or a test
    value), minus the keys in ``drop``; stored as ``data`` (base64), as the API server keeps it."""
    for path in sorted((K8S / "base").glob("*-credentials.example.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc["metadata"]["name"] == name:
            data = {k: (values or {}).get(k, f"test-{k.lower()}") for k in doc["stringData"] if k not in drop}
            return {"apiVersion": "v1", "kind": "Secret", "type": doc.get("type", "Opaque"),
                    "metadata": {"name": name, "namespace": namespace},
                    "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
    raise KeyError(name)


@functools.cache
def _crd_files() -> tuple[dict, ...]:
    return tuple(yaml.load(path.read_text(), Loader=yaml.CSafeLoader) for path in sorted(SCHEMAS.glob("ray.io_*.yaml")))


def crds() -> list[dict]:
    """KubeRay v1.7.0's CRDs (../shared/schemas/kuberay), as ``kubectl apply --server-side`` installs them."""
    return copy.deepcopy(list(_crd_files()))


def operator_deployment(available: bool = True) -> dict:
    condition = {"type": "Available", "status": "True" if available else "False",
                 "reason": "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable"}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
        "name": OPERATOR[1], "namespace": OPERATOR[0], "labels": {"app.kubernetes.io/name": "kuberay-operator"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
                 "template": {"metadata": {"labels": {"app.kubernetes.io/name": "kuberay-operator"}}, "spec": {
                     "containers": [{"name": "kuberay-operator", "image": "quay.io/kuberay/operator:v1.7.0"}]}}},
        "status": {"replicas": 1, "availableReplicas": int(available),
                                            "conditions": [condition]}}


def _moved(obj: dict, namespace: str) -> dict:
    obj = copy.deepcopy(obj)
    if "namespace" in obj["metadata"]:
        obj["metadata"]["namespace"] = namespace
    for subject in obj.get("subjects") or []:
        if subject.get("namespace") == NAMESPACE:
            subject["namespace"] = namespace
    return obj


def install(store: Store, namespace: str = NAMESPACE, kfp_namespace: str = KFP_NAMESPACE, operator: bool = True,
            crd_list: list[dict] | None = None, secrets: bool = True, kfp_secrets: bool = True,
            values: dict[str, str] | None = None, env: dict[str, str] | None = None) -> None:
    """The platform in ``store``; see the module docstring (``crd_list``: other CRDs than v1.7.0's; ``values``:
    the Secrets' values; ``env``: entries added to loomcfm-env, as an overlay's configMapGenerator merges them)."""
    for crd in crds() if crd_list is None else crd_list:
        store.apply(crd)
    if operator:
        store.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR[0]}})
        store.apply(operator_deployment())
    for name in (namespace, kfp_namespace):
        store.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    for obj in render("base"):
        if obj["kind"] in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "ClusterRole", "ClusterRoleBinding"):
            obj = _moved(obj, namespace)
            if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "loomcfm-env":
                obj["data"] = {**obj["data"], **(env or {})}
            store.apply(obj)
    if secrets:
        for name in ("loomcfm-s3", "loomcfm-mlflow"):
            store.apply(example_secret(name, namespace, values))
    if kfp_secrets:  # README: the steps read the Secrets and loomcfm-env in their own namespace
        for name in ("loomcfm-s3", "loomcfm-mlflow"):
            store.apply(example_secret(name, kfp_namespace, values, drop=("MLFLOW_FLASK_SERVER_SECRET_KEY",)))
        copied = store.get("configmaps", namespace, "loomcfm-env")  # the README's jq copy
        store.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "loomcfm-env",
                                                                          "namespace": kfp_namespace},
                     "data": copied["data"]})


def token(store: Store, namespace: str, name: str) -> str:
    """A bearer token of the ServiceAccount ``namespace/name`` (what a pod of it gets mounted)."""
    value = random_secrets.token_hex(16)
    store.tokens[value] = service_account(namespace, name)
    return value
