"""What every step of a loomcfm pipeline gets on the cluster: storage credentials and endpoints, GPUs; and
what makes a train step: its RayJob's arguments, no caching, retries."""

from kfp import dsl, kubernetes
from kfp.dsl import PipelineTask

# Secret and ConfigMap created by k8s/base (kubectl apply -k k8s/overlays/...).
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
ENV_CONFIG_KEYS = {k: k for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL")}
# The pipeline parameters a train step passes on: how and where its RayJob runs (components/train.py).
CLUSTER_PARAMETERS = ("launcher", "namespace", "keep_cluster", "image", "ray_workers", "gpus_per_worker",
                      "worker_cpu", "worker_memory", "gpu_node_selector")
# What names a train step's RayJob. Each placeholder is a whole argument: the KFP driver substitutes one only
# when it is the entire value (kubeflow/pipelines 2.17.0 backend/src/v2/driver/resolve.go resolveInputParameter).
RUN_IDENTITY = {"kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER, "kfp_task": dsl.PIPELINE_TASK_NAME_PLACEHOLDER}
TRAIN_RETRIES = 2


def on_cluster(task: PipelineTask, s3_secret: str, env_config_map: str) -> PipelineTask:
    """Credentials from a Secret and endpoints from a ConfigMap (never in the pipeline package)."""
    kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env=S3_SECRET_KEYS, optional=True)
    kubernetes.use_config_map_as_env(task, config_map_name=env_config_map, config_map_key_to_env=ENV_CONFIG_KEYS,
                                     optional=True)
    return task


def with_gpu(task: PipelineTask, accelerator_type: str, accelerator_limit: int) -> PipelineTask:
    """Accelerators for a step (evaluate and pairs; training when it runs in the step); 0 means CPU only."""
    return task.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_limit)


def cluster_arguments(parameters: dict) -> dict:
    """The train component's RayJob arguments, picked from a pipeline's parameters (its ``locals()``), and
    the run and task placeholders that name the RayJob."""
    return {**{name: parameters[name] for name in CLUSTER_PARAMETERS}, **RUN_IDENTITY}


def training(task: PipelineTask, s3_secret: str, env_config_map: str, accelerator_type: str,
             accelerator_limit: int) -> PipelineTask:
    """A train step: never cached (it has side effects), retried when its pod fails or is evicted: the retry
    has the same run id and task name, so it adopts the step's RayJob or starts one that resumes from the
    latest checkpoint."""
    task = with_gpu(on_cluster(task, s3_secret, env_config_map), accelerator_type, accelerator_limit)
    return task.set_caching_options(False).set_retry(num_retries=TRAIN_RETRIES, backoff_duration="60s",
                                                     backoff_factor=2.0)
