"""Reflow from an existing checkpoint: check → pairs → reflow train → evaluate, with overrides for both."""

from kfp import dsl

from components import cache, evaluate_reflow, pairs, prepare
from loomcfm_core import IMAGE
from pipelines.common import GPU_TOLERATIONS, checking, documented, preparing, step, training


def build(launcher: str = "local"):
    """The pipeline for one launcher (see :func:`pipelines.loomcfm_pipeline.build`)."""
    suffix = "" if launcher == "local" else f"-{launcher}"

    @dsl.pipeline(name=f"loomcfm-reflow{suffix}", description="Reflow a trained LOOM-CFM model: check the cluster, "
                  "generate pairs with a chosen method, train on them from the checkpoint "
                  f"({'as a KubeRay RayJob' if suffix else 'in the step'}), evaluate")
    @documented("Reflow a trained model: the overrides set the pairs (reflow.method, reflow.num_pairs) and the "
                "reflow training (reflow.lr, reflow.epochs, ...).")
    def reflow_pipeline(checkpoint_uri: str, config_yaml: str = "cluster", overrides: list = [],
                        namespace: str = "loomcfm", keep_cluster: bool = False, image: str = IMAGE,
                        ray_workers: int = 1, gpus_per_worker: int = 0, worker_cpu: str = "4",
                        worker_memory: str = "8Gi", gpu_node_selector: str = "nvidia.com/gpu.present=true",
                        s3_secret: str = "loomcfm-s3", mlflow_secret: str = "loomcfm-mlflow",
                        env_config_map: str = "loomcfm-env", accelerator_type: str = "nvidia.com/gpu",
                        accelerator_limit: str = "0", train_accelerator_limit: str = "0",
                        gpu_tolerations: list = GPU_TOLERATIONS, node_selector: dict = {},
                        prepare_cpu: str = "500m", prepare_memory: str = "1Gi", cache_cpu: str = "2",
                        cache_memory: str = "8Gi", train_cpu: str = "4", train_memory: str = "16Gi",
                        evaluate_cpu: str = "4", evaluate_memory: str = "16Gi", pairs_cpu: str = "4",
                        pairs_memory: str = "16Gi"):
        p = dict(locals())
        checked = checking(p, launcher, config_yaml, overrides)
        config = preparing(prepare(config_yaml=config_yaml, overrides=overrides), p).after(checked)
        config = config.outputs["config_yaml"]
        # The image dataset is only needed as the evaluation reference: a no-op when it is already cached.
        dataset_uri = step(cache(config_yaml=config, overrides=[]), p, "cache").outputs["Output"]
        generated = step(pairs(config_yaml=config, overrides=[], checkpoint_uri=checkpoint_uri), p, "pairs",
                         gpus="accelerator_limit")
        reflowed = training(p, "reflow", launcher, config_yaml=config, overrides=[], dataset_uri=dataset_uri,
                            pairs_uri=generated.outputs["Output"], init_from=checkpoint_uri)
        step(evaluate_reflow(config_yaml=config, overrides=[], checkpoint_uri=reflowed.outputs["checkpoint_uri"],
                             dataset_uri=dataset_uri), p, "evaluate_reflow", kind="evaluate",
             gpus="accelerator_limit")

    return reflow_pipeline


reflow_pipeline = build()
