"""What every step of a loomcfm pipeline gets on the cluster: storage credentials and endpoints, GPUs."""

from kfp import kubernetes
from kfp.dsl import PipelineTask

# Secret and ConfigMap created by k8s/base (kubectl apply -k k8s/overlays/...).
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
ENV_CONFIG_KEYS = {k: k for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL")}


def on_cluster(task: PipelineTask, s3_secret: str, env_config_map: str) -> PipelineTask:
    """Credentials from a Secret and endpoints from a ConfigMap (never in the pipeline package)."""
    kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env=S3_SECRET_KEYS, optional=True)
    kubernetes.use_config_map_as_env(task, config_map_name=env_config_map, config_map_key_to_env=ENV_CONFIG_KEYS,
                                     optional=True)
    return task


def with_gpu(task: PipelineTask, accelerator_type: str, accelerator_limit: int) -> PipelineTask:
    """Accelerators for a step (evaluate and pairs; training when it runs in the step); 0 means CPU only."""
    return task.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_limit)
