"""k8s/ as the cluster would see it: every kustomization rendered with ``kubectl kustomize``, the plain
files of k8s/jobs/, and the pods each object makes. Shared by the manifest and the image checks."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import loomcfm_core

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
K8S = REPO / "k8s"
NAMESPACE = "loomcfm"
DEFAULT_IMAGE = f"ghcr.io/loomcfm/loomcfm:{loomcfm_core.__version__}"
IMAGE_REPO = DEFAULT_IMAGE.rsplit(":", 1)[0]


def kubectl() -> str:
    path = shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None)
    if path is None:
        pytest.fail("kubectl (1.27 or newer, with its built-in kustomize v5) is needed to render k8s/: it is not "
                    "on PATH nor at /usr/bin/kubectl. Install a current release binary and rerun (Debian's "
                    "kubernetes-client package is 1.20, too old for these kustomizations).")
    return path


def kustomizations() -> dict[str, Path]:
    """Every buildable kustomization under k8s/ (Components are built through the overlays that use them)."""
    found = {}
    for path in sorted(K8S.rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind", "Kustomization") == "Kustomization":
            found[path.parent.relative_to(K8S).as_posix()] = path.parent
    return found


@functools.cache
def render(name: str) -> tuple[dict, ...]:
    proc = subprocess.run([kubectl(), "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize k8s/{name} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def standalone_documents() -> dict[str, list[dict]]:
    """The plain manifests users `kubectl apply -f` one at a time (and the KFP launcher reads)."""
    return {p.relative_to(K8S).as_posix(): [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted((K8S / "jobs").glob("*.yaml")) if p.name != "kustomization.yaml"}


def all_objects() -> list[tuple[str, dict]]:
    objs = [(f"k8s/{name}", obj) for name in kustomizations() for obj in render(name)]
    objs += [(f"k8s/{name}", obj) for name, docs in standalone_documents().items() for obj in docs]
    return objs


def find(objs, kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def configmaps(objs) -> dict[str, dict]:
    return {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of every pod an object makes, including KubeRay's head, workers and submitter."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [("template", spec["template"])]
    if kind == "CronJob":
        return [("jobTemplate", spec["jobTemplate"]["spec"]["template"])]
    if kind in ("RayJob", "RayCluster"):
        cluster = spec.get("rayClusterSpec", {}) if kind == "RayJob" else spec
        out = [("head", cluster["headGroupSpec"]["template"])]
        out += [(f"worker group {g['groupName']}", g["template"]) for g in cluster.get("workerGroupSpecs", [])]
        if spec.get("submitterPodTemplate"):
            out.append(("submitter", spec["submitterPodTemplate"]))
        return out
    assert "containers" not in json.dumps(obj.get("spec", {})), f"{kind} makes pods this test cannot find"
    return []
