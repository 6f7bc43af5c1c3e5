"""The training RayJob: the packaged template made into one run's RayJob.

The template is ``loomcfm_core/templates/train-rayjob.yaml`` (``k8s/jobs/train-rayjob.yaml`` is a tested byte
copy, so ``kubectl apply`` and a pipeline train the same way). For a run it gets a name and labels that
identify the run (so a retried step finds its RayJob again), the config text in the head container's
``LOOMCFM_CONFIG_YAML``, the ``loomcfm train`` arguments, the image, and from the ``kube`` section the worker
group's shape, the retry and deadline settings and the deletion policy. Rules it keeps, from KubeRay v1.7.0:
a RayJob name is a DNS-1035 label of at most 47 characters (``utils/validation.go``
``ValidateRayJobMetadata``, ``utils/constant.go`` ``MaxRayJobNameLength``); ``deletionRules`` exclude
``shutdownAfterJobFinishes`` and a global TTL (``validateDeletionConfiguration``, ``validateDeletionRules``);
KubeRay gives Ray a pod's CPU and ``nvidia.com/gpu`` limits as ``num-cpus``/``num-gpus``
(``common/pod.go`` ``generateRayStartCommand``, ``addWellKnownAcceleratorResources``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import shlex
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

import yaml

from loomcfm_core import IMAGE
from loomcfm_core.errors import ConfigError, RayJobError
from loomcfm_core.kube.platform import ON_TERMINATE, OWNER_POD, OWNER_UID
from loomcfm_core.kube.settings import GPU_RESOURCE, KubeConfig, parse_quantity, parse_selector

if TYPE_CHECKING:
    from loomcfm_core.config import Config

TEMPLATE = "train-rayjob.yaml"  # in the package loomcfm_core.templates
HEAD_CONTAINER = "ray-head"
CONFIG_ENV = "LOOMCFM_CONFIG_YAML"
RUN_KEY_LABEL = "loomcfm.io/run-key"
RUN_FOLDER = "loomcfm.io/run-folder"
KFP_RUN_ID = "loomcfm.io/kfp-run-id"
KFP_TASK = "loomcfm.io/kfp-task"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def load_template() -> dict:
    """The training RayJob as shipped with the package (wherever it is installed: the image, a laptop)."""
    return yaml.safe_load(resources.files("loomcfm_core.templates").joinpath(TEMPLATE).read_text())


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _label_value(text: str) -> str:
    """``text`` when Kubernetes takes it as a label value (<= 63 characters), else a hash of it."""
    return text if len(text) <= 63 and _LABEL_VALUE.match(text) else _digest(text, 40)


@dataclass(frozen=True)
class RunIdentity:
    """What makes a RayJob this training's: a task of a KFP run, or (from the CLI) the run folder.

    A retried KFP step has the same run id and task name, a rerun CLI command the same run folder, so
    either derives the same RayJob name and adopts the RayJob instead of starting a second training.
    """

    run_folder: str
    kfp_run_id: str = ""
    kfp_task: str = ""

    @property
    def key(self) -> str:
        return f"kfp\0{self.kfp_run_id}\0{self.kfp_task}" if self.kfp_run_id else f"run\0{self.run_folder}"

    def name(self, stage: str = "train") -> str:
        """``loomcfm-<task>-<hash>``: at most 39 characters, a DNS-1035 label as KubeRay requires (the
        RayCluster it makes adds 6)."""
        slug = re.sub(r"[^a-z0-9]+", "-", (self.kfp_task or stage).lower())[:20].strip("-") or "train"
        return f"loomcfm-{slug}-{_digest(self.key, 10)}"

    def labels(self) -> dict[str, str]:
        """Hashes, for selecting (``kubectl get rayjobs -l loomcfm.io/kfp-run-id=<id>``); KubeRay copies them
        onto the RayCluster. The run key label is how a launcher recognises its own RayJob."""
        labels = {RUN_KEY_LABEL: _digest(self.key, 40), RUN_FOLDER: _digest(self.run_folder, 40)}
        if self.kfp_run_id:
            labels[KFP_RUN_ID] = _label_value(self.kfp_run_id)
            labels[KFP_TASK] = _label_value(self.kfp_task)
        return labels

    def annotations(self) -> dict[str, str]:
        """The values themselves (a run folder like ``s3://b/runs/x`` is no label value)."""
        notes = {RUN_FOLDER: self.run_folder}
        if self.kfp_run_id:
            notes.update({KFP_RUN_ID: self.kfp_run_id, KFP_TASK: self.kfp_task})
        return notes


def cluster_config(cfg: Config) -> Config:
    """The config the RayJob trains with: ``ray.*`` from the ``kube`` shape, one Ray Train worker per GPU
    (or per worker pod without GPUs), each with its share of the pod's CPUs, joining the RayJob's cluster."""
    kube = cfg.kube
    per_pod = max(1, kube.gpus_per_worker)
    cpus = math.floor(float(parse_quantity(kube.worker_cpu)) * 1000 / per_pod) / 1000
    if cpus <= 0:
        raise ConfigError(f"kube.worker_cpu={kube.worker_cpu!r} leaves no CPU for each of the {per_pod} Ray Train "
                          f"workers of a pod (kube.gpus_per_worker={kube.gpus_per_worker})")
    out = cfg.model_copy(deep=True)
    out.ray.address = "auto"
    out.ray.num_workers = kube.ray_workers * per_pod
    out.ray.use_gpu = kube.gpus_per_worker > 0
    out.ray.cpus_per_worker = cpus
    return out


def deletion_rules(keep_s: int) -> list[dict]:
    """``keep_cluster``: KubeRay deletes the cluster of a successful job at once; after a failure it deletes
    the workers at once and the head (with its logs) after ``keep_s``. The ``jobDeploymentStatus: Failed``
    rules cover failures whose Ray job never failed (deadline exceeded, submission failed)."""
    def rule(policy: str, ttl: int, **condition: str) -> dict:
        return {"policy": policy, "condition": {**condition, "ttlSeconds": ttl}}

    return [rule("DeleteCluster", 0, jobStatus="SUCCEEDED"),
            rule("DeleteWorkers", 0, jobStatus="FAILED"), rule("DeleteCluster", keep_s, jobStatus="FAILED"),
            rule("DeleteWorkers", 0, jobDeploymentStatus="Failed"),
            rule("DeleteCluster", keep_s, jobDeploymentStatus="Failed")]


def containers(rayjob: dict) -> list[dict]:
    """Every container the RayJob runs: head, workers and the submitter that calls ``ray job submit``."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = [g["template"] for g in (cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", []))]
    if "submitterPodTemplate" in rayjob["spec"]:
        templates.append(rayjob["spec"]["submitterPodTemplate"])
    return [c for template in templates for c in template["spec"]["containers"]]


def _template_args(entrypoint: str) -> list[str]:
    """The template's ``loomcfm train`` arguments minus ``--dataset`` (each run names its own)."""
    tokens = shlex.split(entrypoint)
    if tokens[:2] != ["loomcfm", "train"]:
        raise RayJobError(f"template entrypoint must start with 'loomcfm train', got {entrypoint!r}")
    kept, rest = [], iter(tokens[2:])
    for token in rest:
        if token == "--dataset":
            next(rest, None)
            continue
        if token.startswith("--dataset="):
            continue
        words = [token, next(rest, "")] if token == "--set" else [token]
        if words[-1].removeprefix("--set=").startswith("ray."):
            raise RayJobError(f"template entrypoint sets {words[-1]!r}: a RayJob's ray.* come from the kube section")
        kept += words
    return kept


def _shape_workers(cluster: dict, kube: KubeConfig) -> None:
    """One worker group: ``ray_workers`` pods (replicas = min = max, as KubeRay clamps replicas into
    [min, max]), each with ``worker_cpu``, ``worker_memory`` and ``gpus_per_worker`` GPUs on GPU nodes."""
    groups = cluster.get("workerGroupSpecs", [])
    if len(groups) != 1:
        raise RayJobError(f"the RayJob template needs exactly one worker group, it has {len(groups)}")
    group, count = groups[0], kube.ray_workers
    group.update(replicas=count, minReplicas=count, maxReplicas=count)
    pod = group["template"]["spec"]
    amounts = {"cpu": kube.worker_cpu, "memory": kube.worker_memory}
    if kube.gpus_per_worker:
        amounts[GPU_RESOURCE] = str(kube.gpus_per_worker)
    pod["containers"][0]["resources"] = {"requests": dict(amounts), "limits": dict(amounts)}
    tolerations = [t for t in pod.get("tolerations", []) if t.get("key") != GPU_RESOURCE]
    if kube.gpus_per_worker:
        pod["nodeSelector"] = {**pod.get("nodeSelector", {}), **parse_selector(kube.gpu_node_selector)}
        tolerations.append(dict(GPU_TOLERATION))
    if tolerations:
        pod["tolerations"] = tolerations
    else:
        pod.pop("tolerations", None)


def watched_by(job: dict, owner: tuple[str, str, str] | None, on_terminate: str = "delete") -> None:
    """Tie the RayJob to the KFP step pod that watches it (``owner``: namespace, name, uid): annotations the
    reaper reads (:mod:`loomcfm_core.kube.reaper`), and, in the pod's own namespace, an ownerReference, so
    the garbage collector deletes the RayJob once the pod is gone (Kubernetes allows no owner in another
    namespace: the collector would treat it as absent and delete the RayJob at once). No
    ``blockOwnerDeletion``: it would need ``update pods/finalizers`` under OwnerReferencesPermissionEnforcement."""
    if owner is None:
        return
    namespace, name, uid = owner
    meta = job["metadata"]
    meta["annotations"] = {**meta.get("annotations", {}), OWNER_POD: f"{namespace}/{name}", OWNER_UID: uid,
                           ON_TERMINATE: on_terminate}
    if namespace == meta["namespace"]:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}]


def build_rayjob(template: dict, cfg: Config, identity: RunIdentity, args: list[str], stage: str = "train",
                 owner: tuple[str, str, str] | None = None) -> dict:
    """The RayJob of one training.

    Args:
        cfg: the validated config; the RayJob trains with :func:`cluster_config` of it, as YAML text in the
            head container (where KubeRay's job supervisor starts the entrypoint), so the cluster trains
            exactly what the caller validated.
        args: ``loomcfm train`` arguments after the template's own (``--dataset``, ``--parent-run-id``).
        stage: ``train`` or ``reflow``: part of the name when no KFP task names it.
        owner: the KFP step pod that watches it (:func:`watched_by`), from :func:`loomcfm_core.kfp_env.step_pod`.
    """
    kube, job = cfg.kube, copy.deepcopy(template)
    meta = job["metadata"]
    meta.update(name=identity.name(stage), namespace=kube.namespace)
    meta["labels"] = {**meta.get("labels", {}), **identity.labels()}
    meta["annotations"] = {**meta.get("annotations", {}), **identity.annotations()}
    spec = job["spec"]
    spec["entrypoint"] = shlex.join(["loomcfm", "train", *_template_args(spec["entrypoint"]), *args])
    spec.update(backoffLimit=kube.backoff_limit, activeDeadlineSeconds=kube.active_deadline_s,
                preRunningDeadlineSeconds=kube.pre_running_deadline_s)
    if kube.keep_cluster:  # shutdownAfterJobFinishes (and its TTL) and deletionRules exclude each other
        spec.pop("shutdownAfterJobFinishes", None)
        spec.pop("ttlSecondsAfterFinished", None)
        spec["deletionStrategy"] = {"deletionRules": deletion_rules(kube.keep_cluster_s)}
    else:  # the cluster goes as soon as the job ends; the RayJob and its submitter Job (the driver's log) stay
        spec.update(shutdownAfterJobFinishes=True, ttlSecondsAfterFinished=0)
        spec.pop("deletionStrategy", None)
    _shape_workers(spec["rayClusterSpec"], kube)
    heads = [c for c in containers(job) if c["name"] == HEAD_CONTAINER]
    if not heads:
        raise RayJobError(f"the RayJob template has no head container named {HEAD_CONTAINER!r}")
    for container in containers(job):
        container["image"] = kube.image or IMAGE
    env = [e for e in heads[0].get("env", []) if e["name"] != CONFIG_ENV]
    heads[0]["env"] = [*env, {"name": CONFIG_ENV, "value": cluster_config(cfg).to_yaml()}]
    watched_by(job, owner, kube.on_terminate)
    return job
