"""Which checks ``loomcfm cluster check`` runs where, and what the rendered RayJob and the steps reference.

* From a laptop (``loomcfm cluster check``): the API checks of :mod:`loomcfm_core.kube.preflight` for the
  RayJob the config renders (``--launcher local``: only what the steps need), the Secrets and ConfigMap of
  KFP's namespace, the reaper, and the probe pod (:mod:`loomcfm_core.kube.probe`).
* In the probe pod (``--inside``): MLflow, storage and ``/dev/shm`` from inside the cluster.
* As a pipeline's first step (a KFP pod): the same API checks as the step's ServiceAccount (launcher rayjob),
  the reaper, that storage and tracking are shared (not the pod's disk), and MLflow and storage from the step's
  own pod, whose environment holds what the Secrets of KFP's namespace gave it (``optional`` in the packages:
  a missing one would otherwise surface much later).
* In ``kfp.local`` (no pod) with launcher ``local`` nothing of a cluster is used: the step says so and passes.
"""

from __future__ import annotations

import logging
import os

from loomcfm_core import kfp_env
from loomcfm_core.config import Config
from loomcfm_core.errors import ClusterCheckError, ConfigError
from loomcfm_core.kube import preflight, probe
from loomcfm_core.kube.client import KubeApi, connect
from loomcfm_core.kube.platform import (ENV_CONFIG_MAP, MLFLOW_SECRET, MLFLOW_SECRET_KEYS, S3_SECRET, S3_SECRET_KEYS,
                                        STEP_SHM)
from loomcfm_core.kube.preflight import Check
from loomcfm_core.kube.rayjob import RunIdentity, build_rayjob, containers, load_template
from loomcfm_core.kube.reaper import reap

log = logging.getLogger(__name__)
OVERLAY_FIX = "kubectl apply -k k8s/overlays/<cpu|gpu>"


def needed(*rayjobs: dict) -> dict[tuple[str, str], set[str]]:
    """(kind, name) -> keys of every Secret and ConfigMap the RayJobs' containers read (not ``optional``)."""
    out: dict[tuple[str, str], set[str]] = {}
    for job in rayjobs:
        cluster = job["spec"]["rayClusterSpec"]
        inits = [c for g in (cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", []))
                 for c in g["template"]["spec"].get("initContainers", [])]
        for container in [*containers(job), *inits]:
            for ref in container.get("envFrom", []):
                kind, spec = ("Secret", ref["secretRef"]) if "secretRef" in ref else ("ConfigMap", ref["configMapRef"])
                if not spec.get("optional"):
                    out.setdefault((kind, spec["name"]), set())
            for var in container.get("env", []):
                frm = var.get("valueFrom") or {}
                for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    if key in frm and not frm[key].get("optional"):
                        out.setdefault((kind, frm[key]["name"]), set()).add(frm[key]["key"])
    return out


STEP_NEEDS = {("Secret", S3_SECRET): set(S3_SECRET_KEYS.values()),
              ("Secret", MLFLOW_SECRET): set(MLFLOW_SECRET_KEYS.values()), ("ConfigMap", ENV_CONFIG_MAP): set()}


def fixes(namespace: str, ours: str, wanted: dict[tuple[str, str], set[str]]) -> dict[str, str]:
    out = {}
    for (kind, name), keys in wanted.items():
        if kind == "Secret":
            literals = " ".join(f"--from-literal={k}=..." for k in sorted(keys))
            out[f"{kind}/{name}"] = f"kubectl -n {namespace} create secret generic {name} {literals}"
        elif namespace == ours:
            out[f"{kind}/{name}"] = OVERLAY_FIX
        else:
            out[f"{kind}/{name}"] = (f"kubectl -n {ours} get configmap {name} -o json | jq '.metadata = {{name: "
                                     f".metadata.name}}' | kubectl -n {namespace} apply -f -")
    return out


def step_environment() -> list[Check]:
    """In a KFP step: what the Secrets of its namespace put into its environment."""
    out = []
    for secret, keys in ((S3_SECRET, S3_SECRET_KEYS), (MLFLOW_SECRET, MLFLOW_SECRET_KEYS)):
        missing = sorted(env for env in keys if not os.environ.get(env))
        row = f"step env from Secret {secret}"
        if missing:
            out.append(Check(row, False, f"this step has no {', '.join(missing)}", f"create Secret {secret} with "
                             f"{', '.join(sorted(keys.values()))} in KFP's namespace (README: First run on a cluster)"))
        else:
            out.append(Check(row, True, ", ".join(sorted(keys))))
    return out


def shared(cfg: Config) -> list[Check]:
    """In a KFP pod: storage and tracking that every step shares (not this pod's disk), then the MLflow server
    and the storage themselves; nothing is written to a pod-local folder."""
    try:
        kfp_env.check_shared(cfg)
    except ConfigError as exc:
        return [Check("shared storage and tracking", False, str(exc), "config_yaml=cluster (the packages' default), "
                      "or storage.root=s3://... and tracking.uri=<the MLflow server's URL>")]
    return [Check("shared storage and tracking", True, f"{cfg.storage.root}, {cfg.tracking.uri}"),
            probe.mlflow(cfg.tracking.uri or ""), probe.storage(cfg.storage.root)]


def api_checks(api: KubeApi, cfg: Config) -> tuple[list[Check], dict]:
    """The checks of the API for the RayJob this config renders (also returned: the probe pod is made from it)."""
    kube = cfg.kube
    body = build_rayjob(load_template(), cfg, RunIdentity("cluster-check"), ["--dataset", "s3://cluster-check"])
    rows = [*preflight.crds(api, body), preflight.operator(api, kube.operator),
            preflight.namespace(api, kube.namespace, OVERLAY_FIX), preflight.access(api, kube.namespace)]
    wanted = needed(load_template(), body)
    rows += preflight.references(api, kube.namespace, wanted, fixes(kube.namespace, kube.namespace, wanted))
    rows.append(preflight.nodes(api, body))
    try:
        reaped = reap(api)
    except Exception as exc:  # noqa: BLE001 - a finding, not a crash of the check
        reaped = [f"could not list RayJobs: {exc}"]
    rows.append(Check("RayJobs nobody watches", not any(r.startswith("could not") for r in reaped),
                      "; ".join(reaped) or "none", f"kubectl -n {kube.namespace} delete rayjob <name>"))
    return rows, body


def run(cfg: Config, launcher: str = "rayjob", inside: bool = False, probe_pod: bool = True,
        shm: str | None = None, step: bool = False, api: KubeApi | None = None) -> list[Check]:
    """The checks for where this runs (module docstring); ``step``: as a pipeline's check step."""
    if inside:
        return probe.inside(cfg, shm or STEP_SHM)
    in_pod = step and kfp_env.in_kfp_pod()
    if step and not in_pod and launcher == "local":
        log.info("cluster check skipped: this step runs outside Kubernetes (kfp.local) and trains inside the "
                 "pipeline (launcher local), so no cluster is used")
        return []
    rows, body = [], None
    if launcher == "rayjob":
        api = api or connect(cfg.kube.namespace)
        rows, body = api_checks(api, cfg)
    if in_pod:  # the check step mounts no /dev/shm of its own (its memory limit would cap one): not checked
        return rows + step_environment() + shared(cfg)
    api = api or connect(cfg.kube.namespace)
    kfp = cfg.kube.kfp_namespace
    rows += preflight.references(api, kfp, STEP_NEEDS, fixes(kfp, cfg.kube.namespace, STEP_NEEDS))
    if probe_pod and body is not None and not step:
        rows += probe.run_probe(api, body, cfg)
    return rows


def report(rows: list[Check], where: str, mark: bool = False) -> None:
    """Print the table (``mark``: and the line the outer check reads from the probe pod); raise on any ✗."""
    if mark:
        print(probe.report(rows), flush=True)
    if not rows:
        print(f"loomcfm cluster check ({where}): nothing to check")
        return
    print(f"loomcfm cluster check ({where})\n{preflight.table(rows)}", flush=True)
    failed = [r for r in rows if not r.ok]
    if failed:
        raise ClusterCheckError(f"cluster check: {len(failed)} of {len(rows)} checks failed: "
                                f"{', '.join(r.name for r in failed)}")
