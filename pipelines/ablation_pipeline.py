"""The paper's coupling ablation: cache, then the same config trained and evaluated with each coupling in
parallel (``dsl.ParallelFor``), then one comparison (distance vs NFE per coupling) on the parent run."""

from kfp import dsl

from components import ablation_arm, ablation_plan, ablation_report, cache, prepare
from pipelines.common import on_cluster


def build(parallelism: int = 0):
    """The pipeline; ``parallelism`` bounds how many arms run at once (0: all five, as compiled). The arms
    (:data:`loomcfm_core.ablation.ARMS`) come from the ``ablation_plan`` step, one spec per loop item."""

    @dsl.pipeline(name="loomcfm-ablation", description="LOOM-CFM coupling ablation: independent, minibatch OT, "
                  "fixed, LOOM and LOOM after convergence, trained in parallel and compared by distance vs NFE")
    def ablation_pipeline(config_yaml: str = "digits", overrides: list = [], s3_secret: str = "loomcfm-s3",
                          env_config_map: str = "loomcfm-env"):
        """``config_yaml``: a preset name or config YAML text; ``overrides``: ``key=value`` strings. The arms
        run in CPU steps: kfp 2.17's local runner drops a pipeline parameter that a ``ParallelFor`` task only
        uses in its resource settings ("Parent pipeline input argument ... not found"), so accelerators are
        not a parameter here."""
        prepared = on_cluster(prepare(config_yaml=config_yaml, overrides=overrides,
                                      kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), s3_secret, env_config_map)
        config, parent = prepared.outputs["config_yaml"], prepared.outputs["parent_run_id"]
        cached = on_cluster(cache(config_yaml=config, overrides=[], parent_run_id=parent), s3_secret, env_config_map)
        planned = on_cluster(ablation_plan(config_yaml=config, overrides=[], dataset_uri=cached.outputs["Output"],
                                           parent_run_id=parent), s3_secret, env_config_map)
        with dsl.ParallelFor(items=planned.output, parallelism=parallelism) as spec:
            trained = on_cluster(ablation_arm(spec=spec), s3_secret, env_config_map).set_caching_options(False)
        on_cluster(ablation_report(config_yaml=config, overrides=[], parent_run_id=parent,
                                   arms=dsl.Collected(trained.output)), s3_secret, env_config_map)

    return ablation_pipeline


ablation_pipeline = build()
