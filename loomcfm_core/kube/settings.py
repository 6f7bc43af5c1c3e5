"""The ``kube`` config section: where and how a training runs as a KubeRay RayJob.

It holds the cluster shape (worker pods, GPUs, CPU, memory, GPU nodes), the RayJob's retry and deadline
settings and what the launcher does when it ends or is stopped. The Ray Train settings a RayJob trains with
(``ray.*``) are derived from the same shape (:func:`loomcfm_core.kube.rayjob.cluster_config`), so the worker
group and the training never disagree. Quantities are read by the Kubernetes client's own
``kubernetes.utils.parse_quantity`` (its port of k8s.io/apimachinery ``pkg/api/resource/quantity.go``).
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loomcfm_core.errors import ConfigError

ON_TERMINATE = ("delete", "leave")  # what a SIGTERM'd launcher does with its RayJob
GPU_RESOURCE = "nvidia.com/gpu"

# Label keys and values (k8s.io/apimachinery pkg/util/validation: IsQualifiedName, IsValidLabelValue).
_LABEL_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]"
_LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_LABEL_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes quantity (``500m``, ``8``, ``32Gi``, ``1e3``) as a number; ConfigError when it is not one."""
    from kubernetes.utils import parse_quantity as kubernetes_quantity  # the client's import takes a second

    try:
        value = kubernetes_quantity(text.strip())
    except (ValueError, InvalidOperation) as exc:
        raise ConfigError(f"{text!r} is not a Kubernetes quantity (e.g. 500m, 4, 16Gi): {exc}") from None
    if not value.is_finite() or text.strip().endswith("K"):  # the client reads "K", the API server only "k"
        raise ConfigError(f"{text!r} is not a Kubernetes quantity (e.g. 500m, 4, 16Gi)")
    return value


def parse_selector(text: str) -> dict[str, str]:
    """``key=value[,key=value]`` (a node selector) as a dict; ConfigError naming the bad pair."""
    selector = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not _LABEL_KEY.match(key.strip()) or not _LABEL_VALUE.match(value.strip()):
            raise ConfigError(f"{pair!r} is not a node label key=value pair")
        selector[key.strip()] = value.strip()
    return selector


def as_overrides(**values: object) -> list[str]:
    """``kube.<key>=<value>`` overrides (values as JSON, which the YAML of an override reads back exactly: an
    empty string stays empty, ``"2"`` stays text) from keyword arguments, e.g. a pipeline's parameters; a
    None leaves the config's value."""
    return [f"kube.{key}={json.dumps(value)}" for key, value in values.items() if value is not None]


class KubeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    namespace: str = Field("loomcfm", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
                           description="where the RayJob runs")
    kfp_namespace: str = Field("kubeflow", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
                               description="where KFP runs the pipeline steps (standalone KFP: kubeflow; "
                               "multi-user Kubeflow: the profile namespace); `loomcfm cluster check` checks its "
                               "Secrets")
    operator: str = Field("kuberay-system/kuberay-operator", pattern=r"^[a-z0-9][-a-z0-9]*/[a-z0-9][-a-z0-9.]*$",
                          description="<namespace>/<deployment> of KubeRay's operator, for `loomcfm cluster check`")
    image: str | None = Field(None, description="image of the RayJob's pods; default: the package's image "
                              "(LOOMCFM_IMAGE, else ghcr.io/loomcfm/loomcfm:<version>)")
    ray_workers: int = Field(1, ge=1, description="worker pods of the Ray cluster")
    gpus_per_worker: int = Field(0, ge=0, description=f"{GPU_RESOURCE} per worker pod; one Ray Train worker "
                                 "per GPU (ray.num_workers = ray_workers x gpus_per_worker)")
    worker_cpu: str = Field("4", description="CPU request and limit of a worker pod (quantity)")
    worker_memory: str = Field("8Gi", description="memory request and limit of a worker pod (quantity)")
    gpu_node_selector: str = Field("nvidia.com/gpu.present=true", description="key=value[,key=value]: the "
                                   "nodes GPU workers may run on (empty: any); they also tolerate the "
                                   f"{GPU_RESOURCE} taint")
    backoff_limit: int = Field(2, ge=0, description="KubeRay retries of a failed attempt (each on a new "
                               "cluster, resuming from the latest checkpoint)")
    active_deadline_s: int = Field(86400, ge=1, description="KubeRay fails an attempt this long after it "
                                   "started (per attempt; not retried)")
    pre_running_deadline_s: int = Field(1800, ge=1, description="KubeRay fails (and retries) an attempt "
                                        "that is not running this long after it started: no nodes, no GPUs")
    on_terminate: Literal[ON_TERMINATE] = Field("delete", description="when the launcher gets SIGTERM (the "
                                                "KFP run is terminated, its pod evicted): delete the RayJob, "
                                                "or leave it for a retried step to adopt")
    keep_cluster: bool = Field(False, description="keep a failed RayJob's head pod for post-mortem (workers "
                                "go at once) and leave the RayJob in place")
    keep_cluster_s: int = Field(86400, ge=0, description="with keep_cluster: how long the failed head stays")
    poll_s: float = Field(10.0, gt=0, description="seconds between status reads")
    fail_fast_s: int = Field(300, ge=0, description="end the step when a pod of the RayJob has had a cause that "
                             "waiting cannot fix (image pull, missing Secret or key, crash loop) this long")

    @field_validator("worker_cpu", "worker_memory")
    @classmethod
    def _positive_quantity(cls, value: str) -> str:
        if parse_quantity(value) <= 0:
            raise ValueError(f"must be a positive quantity, got {value!r}")
        return value.strip()

    @field_validator("gpu_node_selector")
    @classmethod
    def _selector(cls, value: str) -> str:
        parse_selector(value)
        return value.strip()

    @property
    def attempts(self) -> int:
        return self.backoff_limit + 1
