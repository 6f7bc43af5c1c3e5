"""check → cache → train → evaluate → pairs → reflow train → evaluate, under one parent MLflow run."""

from kfp import dsl

from components import cache, evaluate, evaluate_reflow, pairs, prepare
from loomcfm_core import IMAGE
from pipelines.common import GPU_TOLERATIONS, checking, documented, preparing, step, training


def build(launcher: str = "local"):
    """The pipeline for one launcher: ``local`` trains inside the train steps, ``rayjob`` has them start and
    watch a KubeRay RayJob each (``pipelines/common.py`` says why this is not a run-time parameter)."""
    suffix = "" if launcher == "local" else f"-{launcher}"

    @dsl.pipeline(name=f"loomcfm{suffix}", description="LOOM-CFM flow matching: check the cluster, cache the dataset, "
                  f"train with LOOM coupling ({'as KubeRay RayJobs' if suffix else 'in the step'}), evaluate (FID vs "
                  "NFE), generate reflow pairs, reflow-train, evaluate again; one MLflow parent run")
    @documented("Train and reflow a LOOM-CFM model.")
    def loomcfm_pipeline(config_yaml: str = "cluster", overrides: list = [], namespace: str = "loomcfm",
                         keep_cluster: bool = False, image: str = IMAGE, ray_workers: int = 1,
                         gpus_per_worker: int = 0, worker_cpu: str = "4", worker_memory: str = "8Gi",
                         gpu_node_selector: str = "nvidia.com/gpu.present=true", s3_secret: str = "loomcfm-s3",
                         mlflow_secret: str = "loomcfm-mlflow", env_config_map: str = "loomcfm-env",
                         accelerator_type: str = "nvidia.com/gpu", accelerator_limit: str = "0",
                         train_accelerator_limit: str = "0", gpu_tolerations: list = GPU_TOLERATIONS,
                         node_selector: dict = {}, prepare_cpu: str = "500m", prepare_memory: str = "1Gi",
                         cache_cpu: str = "2", cache_memory: str = "8Gi", train_cpu: str = "4",
                         train_memory: str = "16Gi", evaluate_cpu: str = "4", evaluate_memory: str = "16Gi",
                         pairs_cpu: str = "4", pairs_memory: str = "16Gi"):
        p = dict(locals())
        checked = checking(p, launcher, config_yaml, overrides)
        config = preparing(prepare(config_yaml=config_yaml, overrides=overrides), p).after(checked)
        config = config.outputs["config_yaml"]
        dataset_uri = step(cache(config_yaml=config, overrides=[]), p, "cache").outputs["Output"]
        base = training(p, "train", launcher, config_yaml=config, overrides=[], dataset_uri=dataset_uri)
        base_eval = step(evaluate(config_yaml=config, overrides=[], checkpoint_uri=base.outputs["checkpoint_uri"],
                                  dataset_uri=dataset_uri), p, "evaluate", gpus="accelerator_limit")
        generated = step(pairs(config_yaml=config, overrides=[], checkpoint_uri=base.outputs["checkpoint_uri"]), p,
                         "pairs", gpus="accelerator_limit")
        reflowed = training(p, "reflow", launcher, config_yaml=config, overrides=[], dataset_uri=dataset_uri,
                            pairs_uri=generated.outputs["Output"], init_from=base.outputs["checkpoint_uri"])
        # The reflow evaluation records the pipeline's summary (base and reflow) on the parent run: it runs last.
        step(evaluate_reflow(config_yaml=config, overrides=[], checkpoint_uri=reflowed.outputs["checkpoint_uri"],
                             dataset_uri=dataset_uri), p, "evaluate_reflow", kind="evaluate",
             gpus="accelerator_limit").after(base_eval)

    return loomcfm_pipeline


loomcfm_pipeline = build()
