"""The paper's coupling ablation: check the cluster, cache, then the same config trained and evaluated with each
coupling in parallel (``dsl.ParallelFor``), then one comparison (distance vs NFE per coupling) on the parent run."""

from kfp import dsl

from components import ablation_arm, ablation_plan, ablation_report, cache, prepare
from pipelines.common import STEP_RESOURCES, checking, documented, preparing, step


def build(parallelism: int = 0):
    """The pipeline; ``parallelism`` bounds how many arms run at once (0: all five, as compiled). The arms
    (:data:`loomcfm_core.choices.ABLATION_ARMS`) come from the ``ablation_plan`` step, one spec per loop item.

    An arm's CPU and memory are the train step's defaults, not parameters, and its steps have no GPUs:
    kfp 2.17's local runner drops a pipeline parameter that a ``ParallelFor`` task uses only in its resource
    settings ("Parent pipeline input argument ... not found"), so ``run-local`` could not run it.
    """

    @dsl.pipeline(name="loomcfm-ablation", description="LOOM-CFM coupling ablation: independent, minibatch OT, "
                  "fixed, LOOM and LOOM after convergence, trained in parallel and compared by distance vs NFE")
    @documented("Train and evaluate the config once per coupling and compare them by distance vs NFE.")
    def ablation_pipeline(config_yaml: str = "cluster", overrides: list = [], s3_secret: str = "loomcfm-s3",
                          mlflow_secret: str = "loomcfm-mlflow", env_config_map: str = "loomcfm-env",
                          prepare_cpu: str = "500m", prepare_memory: str = "1Gi", cache_cpu: str = "2",
                          cache_memory: str = "8Gi"):
        p = dict(locals())
        checked = checking(p, "local", config_yaml, overrides)
        config = preparing(prepare(config_yaml=config_yaml, overrides=overrides), p).after(checked)
        config = config.outputs["config_yaml"]
        dataset_uri = step(cache(config_yaml=config, overrides=[]), p, "cache").outputs["Output"]
        planned = step(ablation_plan(config_yaml=config, overrides=[], dataset_uri=dataset_uri), p,
                       "ablation_plan", kind="prepare")
        arm_resources = dict(zip(("train_cpu", "train_memory"), STEP_RESOURCES["train"]))
        with dsl.ParallelFor(items=planned.output, parallelism=parallelism) as spec:
            trained = step(ablation_arm(spec=spec), {**p, **arm_resources}, "ablation_arm",
                           kind="train").set_caching_options(False)
        # the report writes onto this run's parent MLflow run: never reused from another run
        step(ablation_report(config_yaml=config, overrides=[], arms=dsl.Collected(trained.output)), p,
             "ablation_report", kind="prepare").set_caching_options(False)

    return ablation_pipeline


ablation_pipeline = build()
