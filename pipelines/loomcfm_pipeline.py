"""cache → train → evaluate → pairs → reflow train → evaluate, under one parent MLflow run."""

from kfp import dsl

from components import cache, evaluate, pairs, prepare, train
from pipelines.common import on_cluster, with_gpu


@dsl.pipeline(name="loomcfm", description="LOOM-CFM: cache, train, evaluate (FID vs NFE), reflow pairs, "
              "reflow train, evaluate")
def loomcfm_pipeline(config_yaml: str = "digits", overrides: list = [], launcher: str = "local",
                     namespace: str = "loomcfm", keep_cluster: bool = False, s3_secret: str = "loomcfm-s3",
                     env_config_map: str = "loomcfm-env", accelerator_type: str = "nvidia.com/gpu",
                     accelerator_limit: int = 1, train_accelerator_limit: int = 0):
    """``config_yaml``: a preset name or config YAML text; ``overrides``: ``key=value`` strings;
    ``launcher``: ``local`` (Ray inside the step) or ``rayjob`` (a KubeRay RayJob per training);
    ``train_accelerator_limit``: GPUs for a ``local`` training step (with ``--set ray.use_gpu=true``)."""
    prepared = on_cluster(prepare(config_yaml=config_yaml, overrides=overrides,
                                  kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), s3_secret, env_config_map)
    config, parent = prepared.outputs["config_yaml"], prepared.outputs["parent_run_id"]
    cached = on_cluster(cache(config_yaml=config, overrides=[], parent_run_id=parent), s3_secret, env_config_map)
    dataset_uri = cached.outputs["Output"]
    base = train(config_yaml=config, overrides=[], dataset_uri=dataset_uri, parent_run_id=parent,
                 launcher=launcher, namespace=namespace, keep_cluster=keep_cluster)
    with_gpu(on_cluster(base, s3_secret, env_config_map), accelerator_type,
             train_accelerator_limit).set_caching_options(False)
    base_eval = with_gpu(on_cluster(evaluate(config_yaml=config, overrides=[],
                                             checkpoint_uri=base.outputs["checkpoint_uri"], dataset_uri=dataset_uri,
                                             parent_run_id=parent), s3_secret, env_config_map),
                         accelerator_type, accelerator_limit)
    generated = with_gpu(on_cluster(pairs(config_yaml=config, overrides=[], parent_run_id=parent,
                                          checkpoint_uri=base.outputs["checkpoint_uri"]), s3_secret, env_config_map),
                         accelerator_type, accelerator_limit)
    reflowed = train(config_yaml=config, overrides=[], dataset_uri=dataset_uri, parent_run_id=parent,
                     launcher=launcher, namespace=namespace, keep_cluster=keep_cluster,
                     pairs_uri=generated.outputs["Output"], init_from=base.outputs["checkpoint_uri"])
    with_gpu(on_cluster(reflowed, s3_secret, env_config_map), accelerator_type,
             train_accelerator_limit).set_caching_options(False)
    # The reflow evaluation records the pipeline's summary (base and reflow) on the parent run: it runs last.
    with_gpu(on_cluster(evaluate(config_yaml=config, overrides=[], checkpoint_uri=reflowed.outputs["checkpoint_uri"],
                                 dataset_uri=dataset_uri, parent_run_id=parent, label="evaluate_reflow"),
                        s3_secret, env_config_map), accelerator_type, accelerator_limit).after(base_eval)
