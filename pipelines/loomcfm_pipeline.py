"""cache → train → evaluate → pairs → reflow train → evaluate, under one parent MLflow run."""

from kfp import dsl

from components import cache, evaluate, evaluate_reflow, pairs, prepare, train
from loomcfm_core import IMAGE
from pipelines.common import GPU_TOLERATIONS, cluster_arguments, documented, preparing, step, training


@dsl.pipeline(name="loomcfm", description="LOOM-CFM flow matching: cache the dataset, train with LOOM coupling, "
              "evaluate (FID vs NFE), generate reflow pairs, reflow-train, evaluate again; one MLflow parent run")
@documented("Train and reflow a LOOM-CFM model.")
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
    p = dict(locals())
    cluster = cluster_arguments(p)
    config = preparing(prepare(config_yaml=config_yaml, overrides=overrides), p).outputs["config_yaml"]
    dataset_uri = step(cache(config_yaml=config, overrides=[]), p, "cache").outputs["Output"]
    base = training(train(config_yaml=config, overrides=[], dataset_uri=dataset_uri, **cluster), p, "train")
    base_eval = step(evaluate(config_yaml=config, overrides=[], checkpoint_uri=base.outputs["checkpoint_uri"],
                              dataset_uri=dataset_uri), p, "evaluate", gpus="accelerator_limit")
    generated = step(pairs(config_yaml=config, overrides=[], checkpoint_uri=base.outputs["checkpoint_uri"]), p,
                     "pairs", gpus="accelerator_limit")
    reflowed = training(train(config_yaml=config, overrides=[], dataset_uri=dataset_uri,
                              pairs_uri=generated.outputs["Output"], init_from=base.outputs["checkpoint_uri"],
                              **cluster), p, "reflow")
    # The reflow evaluation records the pipeline's summary (base and reflow) on the parent run: it runs last.
    step(evaluate_reflow(config_yaml=config, overrides=[], checkpoint_uri=reflowed.outputs["checkpoint_uri"],
                         dataset_uri=dataset_uri), p, "evaluate_reflow", kind="evaluate",
         gpus="accelerator_limit").after(base_eval)
