"""cache → train → evaluate → pairs → reflow train → evaluate, under one parent MLflow run."""

from kfp import dsl

from components import cache, evaluate, pairs, prepare, train
from loomcfm_core import IMAGE
from pipelines.common import GPU_TOLERATIONS, cluster_arguments, preparing, step, training


@dsl.pipeline(name="loomcfm", description="LOOM-CFM flow matching: cache the dataset, train with LOOM coupling, "
              "evaluate (FID vs NFE), generate reflow pairs, reflow-train, evaluate again; one MLflow parent run")
def loomcfm_pipeline(config_yaml: str = "cluster", overrides: list = [], launcher: str = "local",
                     namespace: str = "loomcfm", keep_cluster: bool = False, image: str = IMAGE,
                     ray_workers: int = 1, gpus_per_worker: int = 0, worker_cpu: str = "4",
                     worker_memory: str = "8Gi", gpu_node_selector: str = "nvidia.com/gpu.present=true",
                     s3_secret: str = "loomcfm-s3", mlflow_secret: str = "loomcfm-mlflow",
                     env_config_map: str = "loomcfm-env", accelerator_type: str = "nvidia.com/gpu",
                     accelerator_limit: str = "1", train_accelerator_limit: str = "0",
                     gpu_tolerations: list = GPU_TOLERATIONS, node_selector: dict = {},
                     prepare_cpu: str = "500m", prepare_memory: str = "1Gi", cache_cpu: str = "2",
                     cache_memory: str = "8Gi", train_cpu: str = "4", train_memory: str = "16Gi",
                     evaluate_cpu: str = "4", evaluate_memory: str = "16Gi", pairs_cpu: str = "4",
                     pairs_memory: str = "16Gi"):
    """Train and reflow a LOOM-CFM model.

    Args:
        config_yaml: A preset name (cluster: digits on the k8s/ platform) or a whole loomcfm config as YAML.
        overrides: key=value config overrides, e.g. ["train.lr=1e-4"].
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
        train_cpu: CPU request and limit of a train step.
        train_memory: Memory request and limit of a train step.
        evaluate_cpu: CPU request and limit of an evaluate step.
        evaluate_memory: Memory request and limit of an evaluate step.
        pairs_cpu: CPU request and limit of the pairs step.
        pairs_memory: Memory request and limit of the pairs step.
    """
    p = dict(locals())
    cluster = cluster_arguments(p)
    config = preparing(prepare(config_yaml=config_yaml, overrides=overrides), p).outputs["config_yaml"]
    dataset_uri = step(cache(config_yaml=config, overrides=[]), p, "cache").outputs["Output"]
    base = training(train(config_yaml=config, overrides=[], dataset_uri=dataset_uri, **cluster), p, "train")
    step(evaluate(config_yaml=config, overrides=[], checkpoint_uri=base.outputs["checkpoint_uri"],
                  dataset_uri=dataset_uri), p, "evaluate", gpus="accelerator_limit")
    generated = step(pairs(config_yaml=config, overrides=[], checkpoint_uri=base.outputs["checkpoint_uri"]), p,
                     "pairs", gpus="accelerator_limit")
    reflowed = training(train(config_yaml=config, overrides=[], dataset_uri=dataset_uri,
                              pairs_uri=generated.outputs["Output"], init_from=base.outputs["checkpoint_uri"],
                              **cluster), p, "reflow")
    step(evaluate(config_yaml=config, overrides=[], checkpoint_uri=reflowed.outputs["checkpoint_uri"],
                  dataset_uri=dataset_uri, label="evaluate_reflow"), p, "evaluate_reflow", kind="evaluate",
         gpus="accelerator_limit")
