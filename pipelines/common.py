"""What every step of a loomcfm pipeline gets on the cluster, from the pipeline's parameters: credentials and
endpoints, its CPU and memory, a memory-backed /dev/shm, GPUs with their toleration and node selector, its
display name, and whether KFP may reuse it.

Rules from the KFP v2 backend (kubeflow/pipelines 2.17.0) that shape this module:
- A resource field that references a parameter is resolved with ``GetStringValue()``
  (``backend/src/v2/driver/resolve.go`` ``resolvePodSpecInputRuntimeParameter``): a number parameter reads as
  "" (no GPU limit, silently; a CPU/memory quantity fails to parse), so every such parameter is a ``str``,
  as in KFP's own ``pipeline_with_string_machine_fields_pipeline_input.py``.
- Tolerations and node selectors from a parameter must be a list or dict parameter
  (``backend/src/v2/driver/k8s.go``, ``resolveK8sJsonParameter``).
- Every input of a step is part of its cache key (``backend/src/v2/cacheutils/cache.go`` ``GenerateCacheKey``),
  environment variables are not: the KFP run id reaches steps as ``KFP_RUN_ID`` from the pod's
  ``pipeline/runid`` label (``loomcfm_core/kfp_env.py``), so deterministic steps stay reusable.
"""

import sys

from kfp import dsl, kubernetes
from kfp.dsl import PipelineTask

from components import cluster_check, train

from loomcfm_core.kfp_env import RUN_ID_ENV
from loomcfm_core.kube.platform import ENV_CONFIG_KEYS, MLFLOW_SECRET_KEYS, S3_SECRET_KEYS, STEP_SHM
from loomcfm_core.kube.rayjob import GPU_TOLERATION
from loomcfm_core.private_api import PrivateSurface

# the one private name of kfp we touch (replaced below; tests/test_private_api.py checks the pinned version has it)
SURFACE = PrivateSurface("kfp", "2.17.*", names=("kfp.dsl.pipeline_task.PipelineTask._ensure_container_spec_exists",))


def _ensure_container_spec_exists(self: PipelineTask) -> None:
    """kfp 2.17's ``PipelineTask._ensure_container_spec_exists`` (``kfp/dsl/pipeline_task.py``, run by each
    ``set_cpu_limit``, ``set_memory_request``, ``add_node_selector_constraint``, ...) calls ``inspect.stack()``
    only to name its caller in the error: that reads the source of every frame on the stack, and with torch
    imported costs 0.1-0.5 s a call, 10-40 s to build our pipelines (each ``loomcfm pipeline`` command, each
    process that imports them). The same check and message, the caller's name read from its frame."""
    if self.container_spec is None:
        raise ValueError(f"{sys._getframe(1).f_code.co_name} can only be used on single-step components, not "
                         "pipelines used as components, or special components like importers.")


if not SURFACE.missing():
    PipelineTask._ensure_container_spec_exists = _ensure_container_spec_exists

# The Secrets and the ConfigMap created with k8s/ (kubectl apply -k k8s/overlays/...) and what each step reads
# from them (env name -> key) are loomcfm_core/kube/platform.py's: `loomcfm cluster check` checks the same.
RUN_ID_FIELD = "metadata.labels['pipeline/runid']"
# The pipeline parameters a train step passes on: how and where its RayJob runs (components/train.py). The
# launcher is not one: each package is built for one (pipelines/runner.py), because a step that only watches
# a RayJob is sized differently and kfp 2.17's compiler cannot branch on it (a dsl.If sub-DAG does not get the
# parameters its tasks use only in their resources: the compiled package references inputs it never passes).
CLUSTER_PARAMETERS = ("namespace", "keep_cluster", "image", "ray_workers", "gpus_per_worker", "worker_cpu",
                      "worker_memory", "gpu_node_selector")
# What names a train step's RayJob. Each placeholder is a whole argument: the KFP driver substitutes one only
# when it is the entire value (kubeflow/pipelines 2.17.0 backend/src/v2/driver/resolve.go resolveInputParameter).
RUN_IDENTITY = {"kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER, "kfp_task": dsl.PIPELINE_TASK_NAME_PLACEHOLDER}
TRAIN_RETRIES = 2
# Each step's CPU and memory (request = limit: a Guaranteed pod, the last the kubelet evicts), as pipeline
# parameters <step>_cpu / <step>_memory with these defaults. Memory covers SHM_SIZE (a memory-backed volume
# counts against the container's limit).
STEP_RESOURCES = {"prepare": ("500m", "1Gi"), "cache": ("2", "8Gi"), "train": ("4", "16Gi"),
                  "evaluate": ("4", "16Gi"), "pairs": ("4", "16Gi")}
# Steps sized by what they are, not by a parameter: the cluster check, and a train step that only watches its
# RayJob (launcher rayjob: the training runs on the RayJob's own pods; no /dev/shm, no GPU).
FIXED_RESOURCES = {"check": ("250m", "512Mi"), "watch": ("500m", "512Mi")}
# /dev/shm of the steps that run DataLoader workers or Ray (platform.STEP_SHM). The size is static:
# kfp-kubernetes 2.17 takes no parameter here.
SHM_SIZE = STEP_SHM
GPU_TOLERATIONS = [GPU_TOLERATION]
DISPLAY = {"check": "check cluster", "prepare": "validate config", "cache": "cache dataset", "train": "train (LOOM)",
           "train_rayjob": "train (LOOM) as RayJob", "reflow_rayjob": "train (reflow) as RayJob",
           "evaluate": "evaluate", "pairs": "reflow pairs", "reflow": "train (reflow)",
           "evaluate_reflow": "evaluate (reflow)", "ablation_plan": "plan ablation arms",
           "ablation_arm": "train + evaluate (one coupling)", "ablation_report": "compare couplings"}


# What each pipeline parameter means: the descriptions the KFP UI shows (the compiler reads them from the
# function's docstring, `Args:` section).
PARAMETER_DOCS = {
    "checkpoint_uri": "The trained model's checkpoint (s3://.../checkpoints/step-N.pt).",
    "config_yaml": "A preset name (cluster: digits on the k8s/ platform) or a whole loomcfm config as YAML.",
    "overrides": "key=value config overrides, e.g. [\"train.lr=1e-4\"] or [\"reflow.method=euler-4\"].",
    "namespace": "Namespace of the RayJobs (launcher rayjob).",
    "keep_cluster": "Keep a failed RayJob's head pod for post-mortem.",
    "image": "Image of the RayJob's pods.",
    "ray_workers": "Worker pods of each RayJob.",
    "gpus_per_worker": "GPUs per RayJob worker pod (one Ray Train worker per GPU).",
    "worker_cpu": "CPU of a RayJob worker pod (quantity).",
    "worker_memory": "Memory of a RayJob worker pod (quantity).",
    "gpu_node_selector": "key=value[,key=value] nodes for GPU RayJob workers.",
    "s3_secret": "Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.",
    "mlflow_secret": "Secret with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.",
    "env_config_map": "ConfigMap with the S3 endpoint, region, LOOMCFM_STORAGE_ROOT and LOOMCFM_TRACKING_URI.",
    "accelerator_type": "Resource name of the GPUs.",
    "accelerator_limit": "GPUs of the evaluate and pairs steps, as text (\"0\": CPU only).",
    "train_accelerator_limit": "GPUs of a train step that trains inside itself (launcher local), as text.",
    "gpu_tolerations": "Tolerations of the steps that may use GPUs (a list of Kubernetes tolerations).",
    "node_selector": "Node labels the steps that may use GPUs must run on ({}: any node).",
    **{f"{step}_{what}": f"{label} request and limit of the {step} step{'s' * (step in ('train', 'evaluate'))}."
       for step in STEP_RESOURCES for what, label in (("cpu", "CPU"), ("memory", "Memory"))},
}


def documented(summary: str):
    """Give a pipeline function the docstring KFP reads its description and parameter descriptions from:
    ``summary`` and an ``Args:`` section from ``PARAMETER_DOCS`` (both pipelines share the parameters)."""
    def wrap(func):
        names = func.__code__.co_varnames[:func.__code__.co_argcount]
        func.__doc__ = f"{summary}\n\nArgs:\n" + "\n".join(f"    {name}: {PARAMETER_DOCS[name]}" for name in names)
        return func
    return wrap


def step(task: PipelineTask, params: dict, name: str, kind: str | None = None,
         gpus: str | None = None) -> PipelineTask:
    """Dress one task of a pipeline for the cluster.

    Args:
        task: the component's task.
        params: the pipeline function's parameters (its ``locals()`` at the top), channels to reference.
        name: the key of ``DISPLAY`` (the task's name in the UI).
        kind: the key of ``STEP_RESOURCES`` whose ``<kind>_cpu`` / ``<kind>_memory`` size the pod; default
            ``name``.
        gpus: the name of the ``str`` parameter with the step's GPU count, for the steps that may use GPUs.

    Returns:
        The task, with credentials (Secrets), endpoints and storage/tracking settings (ConfigMap), the run
        id, CPU/memory requests and limits (``FIXED_RESOURCES`` for the check and a watch-only train step),
        /dev/shm for the steps that compute (not ``prepare``, the check, a watcher), and for GPU steps the GPU
        limit, toleration and node selector. Caching stays on (KFP's default) unless the caller turns it off.
    """
    kind = kind or name
    task.set_display_name(DISPLAY[name])
    if kind in FIXED_RESOURCES:
        params = {**params, **dict(zip((f"{kind}_cpu", f"{kind}_memory"), FIXED_RESOURCES[kind]))}
    kubernetes.use_secret_as_env(task, secret_name=params["s3_secret"], secret_key_to_env=S3_SECRET_KEYS,
                                 optional=True)
    kubernetes.use_secret_as_env(task, secret_name=params["mlflow_secret"], secret_key_to_env=MLFLOW_SECRET_KEYS,
                                 optional=True)
    kubernetes.use_config_map_as_env(task, config_map_name=params["env_config_map"],
                                     config_map_key_to_env=ENV_CONFIG_KEYS, optional=True)
    kubernetes.use_field_path_as_env(task, env_name=RUN_ID_ENV, field_path=RUN_ID_FIELD)
    cpu, memory = params[f"{kind}_cpu"], params[f"{kind}_memory"]
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    if kind not in ("prepare", "watch", "check"):
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=SHM_SIZE)
    if gpus is not None:
        task.set_accelerator_type(params["accelerator_type"]).set_accelerator_limit(params[gpus])
        kubernetes.add_toleration_json(task, params["gpu_tolerations"])
        kubernetes.add_node_selector_json(task, params["node_selector"])
    return task


def cluster_arguments(parameters: dict, launcher: str) -> dict:
    """The train component's RayJob arguments, picked from a pipeline's parameters (its ``locals()``), the
    package's launcher, and the run and task placeholders that name the RayJob."""
    return {**{name: parameters[name] for name in CLUSTER_PARAMETERS}, "launcher": launcher, **RUN_IDENTITY}


def training(params: dict, name: str, launcher: str, **inputs) -> PipelineTask:
    """A train step: never cached (it has side effects), retried when its pod fails or is evicted: the retry
    has the same run id and task name, so it adopts the step's RayJob or starts one that resumes from the
    latest checkpoint. With ``launcher`` rayjob it only watches (``FIXED_RESOURCES['watch']``: no /dev/shm, no
    GPU); with ``local`` it trains inside itself with the train resources and ``train_accelerator_limit`` GPUs.

    Args:
        params: the pipeline function's parameters (channels).
        name: ``train`` or ``reflow`` (the display names).
        inputs: the train component's other inputs.
    """
    task = train(**inputs, **cluster_arguments(params, launcher))
    if launcher == "rayjob":
        task = step(task, params, f"{name}_rayjob", kind="watch")
    else:
        task = step(task, params, name, kind="train", gpus="train_accelerator_limit")
    return task.set_caching_options(False).set_retry(num_retries=TRAIN_RETRIES, backoff_duration="60s",
                                                     backoff_factor=2.0)


def checking(params: dict, launcher: str, config_yaml, overrides) -> PipelineTask:
    """The first step: ``loomcfm cluster check`` for the package's launcher and this run's cluster shape; never
    cached (the cluster changes, and it reaps RayJobs of terminated runs)."""
    cluster = {k: params[k] for k in CLUSTER_PARAMETERS if k in params and k != "keep_cluster"}
    task = cluster_check(config_yaml=config_yaml, overrides=overrides, launcher=launcher, **cluster)
    return step(task, params, "check").set_caching_options(False)


def preparing(task: PipelineTask, params: dict) -> PipelineTask:
    """The first step: never cached, because it opens this run's parent MLflow run."""
    return step(task, params, "prepare").set_caching_options(False)
