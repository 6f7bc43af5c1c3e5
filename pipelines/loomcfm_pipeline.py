"""cache → train → evaluate → pairs → reflow train → evaluate, under one parent MLflow run."""

from kfp import dsl

from components import cache, evaluate, pairs, prepare, train
from loomcfm_core import IMAGE
from pipelines.common import cluster_arguments, on_cluster, training, with_gpu


@dsl.pipeline(name="loomcfm", description="LOOM-CFM: cache, train, evaluate (FID vs NFE), reflow pairs, "
              "reflow train, evaluate")
def loomcfm_pipeline(config_yaml: str = "digits", overrides: list = [], launcher: str = "local",
                     namespace: str = "loomcfm", keep_cluster: bool = False, image: str = IMAGE,
                     ray_workers: int = 1, gpus_per_worker: int = 0, worker_cpu: str = "4",
                     worker_memory: str = "8Gi", gpu_node_selector: str = "nvidia.com/gpu.present=true",
                     s3_secret: str = "loomcfm-s3", env_config_map: str = "loomcfm-env",
                     accelerator_type: str = "nvidia.com/gpu", accelerator_limit: int = 1,
                     train_accelerator_limit: int = 0):
    """``config_yaml``: a preset name or config YAML text; ``overrides``: ``key=value`` strings;
    ``launcher``: ``local`` (Ray inside the step) or ``rayjob`` (a KubeRay RayJob per training, in
    ``namespace``, running ``image``, with ``ray_workers`` worker pods of ``gpus_per_worker`` GPUs,
    ``worker_cpu`` and ``worker_memory`` each); ``train_accelerator_limit``: GPUs for a ``local`` training step
    (with ``--set ray.use_gpu=true``)."""
    cluster = cluster_arguments(locals())
    prepared = on_cluster(prepare(config_yaml=config_yaml, overrides=overrides,
                                  kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), s3_secret, env_config_map)
    config, parent = prepared.outputs["config_yaml"], prepared.outputs["parent_run_id"]
    cached = on_cluster(cache(config_yaml=config, overrides=[], parent_run_id=parent), s3_secret, env_config_map)
    dataset_uri = cached.outputs["Output"]
    base = training(train(config_yaml=config, overrides=[], dataset_uri=dataset_uri, parent_run_id=parent, **cluster),
                    s3_secret, env_config_map, accelerator_type, train_accelerator_limit)
    base_eval = with_gpu(on_cluster(evaluate(config_yaml=config, overrides=[],
                                             checkpoint_uri=base.outputs["checkpoint_uri"], dataset_uri=dataset_uri,
                                             parent_run_id=parent), s3_secret, env_config_map),
                         accelerator_type, accelerator_limit)
    generated = with_gpu(on_cluster(pairs(config_yaml=config, overrides=[], parent_run_id=parent,
                                          checkpoint_uri=base.outputs["checkpoint_uri"]), s3_secret, env_config_map),
                         accelerator_type, accelerator_limit)
    reflowed = training(train(config_yaml=config, overrides=[], dataset_uri=dataset_uri, parent_run_id=parent,
                              pairs_uri=generated.outputs["Output"], init_from=base.outputs["checkpoint_uri"],
                              **cluster), s3_secret, env_config_map, accelerator_type, train_accelerator_limit)
    # The reflow evaluation records the pipeline's summary (base and reflow) on the parent run: it runs last.
    with_gpu(on_cluster(evaluate(config_yaml=config, overrides=[], checkpoint_uri=reflowed.outputs["checkpoint_uri"],
                                 dataset_uri=dataset_uri, parent_run_id=parent, label="evaluate_reflow"),
                        s3_secret, env_config_map), accelerator_type, accelerator_limit).after(base_eval)
