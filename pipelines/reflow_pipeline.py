"""Reflow from an existing checkpoint: pairs → reflow train → evaluate, with overrides for both."""

from kfp import dsl

from components import cache, evaluate, pairs, prepare, train
from loomcfm_core import IMAGE
from pipelines.common import GPU_TOLERATIONS, cluster_arguments, preparing, step, training


@dsl.pipeline(name="loomcfm-reflow", description="Reflow a trained LOOM-CFM model: generate pairs with a chosen "
              "method, train on them from the checkpoint, evaluate")
def reflow_pipeline(checkpoint_uri: str, config_yaml: str = "cluster", overrides: list = [],
                    launcher: str = "local", namespace: str = "loomcfm", keep_cluster: bool = False,
                    image: str = IMAGE, ray_workers: int = 1, gpus_per_worker: int = 0, worker_cpu: str = "4",
                    worker_memory: str = "8Gi", gpu_node_selector: str = "nvidia.com/gpu.present=true",
                    s3_secret: str = "loomcfm-s3", mlflow_secret: str = "loomcfm-mlflow",
                    env_config_map: str = "loomcfm-env", accelerator_type: str = "nvidia.com/gpu",
                    accelerator_limit: str = "1", train_accelerator_limit: str = "0",
                    gpu_tolerations: list = GPU_TOLERATIONS, node_selector: dict = {},
                    prepare_cpu: str = "500m", prepare_memory: str = "1Gi", cache_cpu: str = "2",
                    cache_memory: str = "8Gi", train_cpu: str = "4", train_memory: str = "16Gi",
                    evaluate_cpu: str = "4", evaluate_memory: str = "16Gi", pairs_cpu: str = "4",
                    pairs_memory: str = "16Gi"):
    """Reflow a trained model.

    Args:
        checkpoint_uri: The trained model's checkpoint (s3://.../checkpoints/step-N.pt).
        config_yaml: A preset name (cluster: digits on the k8s/ platform) or a whole loomcfm config as YAML.
        overrides: key=value overrides of the pairs (reflow.method, reflow.num_pairs) and the reflow training
            (reflow.lr, reflow.epochs, reflow.batch_size, ...).
        launcher: Where training runs: local (Ray inside the train step) or rayjob (a KubeRay RayJob).
        namespace: Namespace of the RayJobs (launcher rayjob).
        keep_cluster: Keep a failed RayJob's head pod for post-mortem.
        image: Image of the RayJob's pods.
        ray_workers: Worker pods of each RayJob.
        gpus_per_worker: GPUs per RayJob worker pod (one Ray Train worker per GPU).
        worker_cpu: CPU of a RayJob worker pod (quantity).
        worker_memory: Memory of a RayJob worker pod (quantity).
        gpu_node_selector: key=value[,key=value] nodes for GPU RayJob workers.
        s3_secret: Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
        mlflow_secret: Secret with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.
        env_config_map: ConfigMap with the S3 endpoint, region, LOOMCFM_STORAGE_ROOT and LOOMCFM_TRACKING_URI.
        accelerator_type: Resource name of the GPUs.
        accelerator_limit: GPUs of the evaluate and pairs steps, as text ("0": CPU only).
        train_accelerator_limit: GPUs of a train step that trains inside itself (launcher local), as text.
        gpu_tolerations: Tolerations of the steps that may use GPUs (a list of Kubernetes tolerations).
        node_selector: Node labels the steps that may use GPUs must run on ({}: any node).
        prepare_cpu: CPU request and limit of the config check.
        prepare_memory: Memory request and limit of the config check.
        cache_cpu: CPU request and limit of the cache step.
        cache_memory: Memory request and limit of the cache step.
        train_cpu: CPU request and limit of the train step.
        train_memory: Memory request and limit of the train step.
        evaluate_cpu: CPU request and limit of the evaluate step.
        evaluate_memory: Memory request and limit of the evaluate step.
        pairs_cpu: CPU request and limit of the pairs step.
        pairs_memory: Memory request and limit of the pairs step.
    """
    p = dict(locals())
    cluster = cluster_arguments(p)
    config = preparing(prepare(config_yaml=config_yaml, overrides=overrides), p).outputs["config_yaml"]
    # The image dataset is only needed as the evaluation reference: a no-op when it is already cached.
    dataset_uri = step(cache(config_yaml=config, overrides=[]), p, "cache").outputs["Output"]
    generated = step(pairs(config_yaml=config, overrides=[], checkpoint_uri=checkpoint_uri), p, "pairs",
                     gpus="accelerator_limit")
    reflowed = training(train(config_yaml=config, overrides=[], dataset_uri=dataset_uri,
                              pairs_uri=generated.outputs["Output"], init_from=checkpoint_uri, **cluster), p, "reflow")
    step(evaluate(config_yaml=config, overrides=[], checkpoint_uri=reflowed.outputs["checkpoint_uri"],
                  dataset_uri=dataset_uri, label="evaluate_reflow"), p, "evaluate_reflow", kind="evaluate",
         gpus="accelerator_limit")
