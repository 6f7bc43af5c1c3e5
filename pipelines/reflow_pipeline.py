"""Reflow from an existing checkpoint: pairs → reflow train → evaluate, with overrides for both."""

from kfp import dsl

from components import cache, evaluate, pairs, prepare, train
from loomcfm_core import IMAGE
from pipelines.common import cluster_arguments, on_cluster, training, with_gpu


@dsl.pipeline(name="loomcfm-reflow", description="Reflow a trained LOOM-CFM model: generate pairs with a chosen "
              "method, train on them from the checkpoint, evaluate")
def reflow_pipeline(checkpoint_uri: str, config_yaml: str = "digits", overrides: list = [],
                    launcher: str = "local", namespace: str = "loomcfm", keep_cluster: bool = False,
                    image: str = IMAGE, ray_workers: int = 1, gpus_per_worker: int = 0, worker_cpu: str = "4",
                    worker_memory: str = "8Gi", gpu_node_selector: str = "nvidia.com/gpu.present=true",
                    s3_secret: str = "loomcfm-s3", env_config_map: str = "loomcfm-env",
                    accelerator_type: str = "nvidia.com/gpu", accelerator_limit: int = 1,
                    train_accelerator_limit: int = 0):
    """``overrides`` set the pairs (``reflow.method``, ``reflow.num_pairs``) and the reflow training
    (``reflow.lr``, ``reflow.epochs``, ``reflow.batch_size``, ...); the cluster parameters are the full
    pipeline's."""
    cluster = cluster_arguments(locals())
    prepared = on_cluster(prepare(config_yaml=config_yaml, overrides=overrides,
                                  kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), s3_secret, env_config_map)
    config, parent = prepared.outputs["config_yaml"], prepared.outputs["parent_run_id"]
    # The image dataset is only needed as the evaluation reference: a no-op when it is already cached.
    cached = on_cluster(cache(config_yaml=config, overrides=[], parent_run_id=parent), s3_secret, env_config_map)
    generated = with_gpu(on_cluster(pairs(config_yaml=config, overrides=[], checkpoint_uri=checkpoint_uri,
                                          parent_run_id=parent), s3_secret, env_config_map),
                         accelerator_type, accelerator_limit)
    reflowed = training(train(config_yaml=config, overrides=[], dataset_uri=cached.outputs["Output"],
                              parent_run_id=parent, pairs_uri=generated.outputs["Output"], init_from=checkpoint_uri,
                              **cluster), s3_secret, env_config_map, accelerator_type, train_accelerator_limit)
    with_gpu(on_cluster(evaluate(config_yaml=config, overrides=[], checkpoint_uri=reflowed.outputs["checkpoint_uri"],
                                 dataset_uri=cached.outputs["Output"], parent_run_id=parent,
                                 label="evaluate_reflow"), s3_secret, env_config_map),
             accelerator_type, accelerator_limit)
