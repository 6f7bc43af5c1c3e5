"""KFP steps: FID (or fd_<dataset>) against NFE for each sampling method, of a checkpoint or of the reflowed
model, whose step also records the pipeline's summary on the parent run."""

from kfp import dsl
from kfp.dsl import Markdown, Metrics, Output

from loomcfm_core import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(config_yaml: str, overrides: list, checkpoint_uri: str, dataset_uri: str, metrics: Output[Metrics],
             report: Output[Markdown]) -> str:
    """Returns the URI of the results (grids, plot, results.json); ``report`` is the table for the KFP UI.
    The evaluation of a fixed checkpoint is deterministic, so KFP may reuse this step."""
    from loomcfm_core.offline import stay_offline

    stay_offline()
    from loomcfm_core import stages
    from loomcfm_core.config import load_config_text
    from loomcfm_core.kfp_env import pipeline_parent
    from loomcfm_core.kfp_io import report_evaluation

    cfg = load_config_text(config_yaml, overrides)
    out = stages.evaluate(cfg, checkpoint_uri, dataset_uri or None, parent_run_id=pipeline_parent(cfg))
    report_evaluation(metrics, report, out)
    return out.eval_uri


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_reflow(config_yaml: str, overrides: list, checkpoint_uri: str, dataset_uri: str,
                    metrics: Output[Metrics], report: Output[Markdown]) -> str:
    """The last step of a pipeline: evaluates the reflowed model as ``evaluate`` does, then records the
    pipeline's summary (base vs reflow) on its parent MLflow run."""
    from loomcfm_core.offline import stay_offline

    stay_offline()
    from loomcfm_core import stages
    from loomcfm_core.config import load_config_text
    from loomcfm_core.kfp_env import pipeline_parent
    from loomcfm_core.kfp_io import report_evaluation

    cfg = load_config_text(config_yaml, overrides)
    out = stages.evaluate_reflow(cfg, checkpoint_uri, pipeline_parent(cfg), dataset_uri or None)
    report_evaluation(metrics, report, out)
    return out.eval_uri
