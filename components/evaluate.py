"""KFP step: FID (or fd_<dataset>) against NFE for each sampling method."""

from kfp import dsl
from kfp.dsl import Markdown, Metrics, Output

from loomcfm_core import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(config_yaml: str, overrides: list, checkpoint_uri: str, dataset_uri: str, metrics: Output[Metrics],
             report: Output[Markdown], label: str = "evaluate") -> str:
    """Returns the URI of the results (grids, plot, results.json); ``report`` is the table for the KFP UI.
    The evaluation of a fixed checkpoint is deterministic, so KFP may reuse this step."""
    from loomcfm_core import stages
    from loomcfm_core.config import load_config_text
    from loomcfm_core.kfp_env import pipeline_parent
    from loomcfm_core.kfp_io import log_numbers, report_table

    cfg = load_config_text(config_yaml, overrides)
    out = stages.evaluate(cfg, checkpoint_uri, dataset_uri or None, parent_run_id=pipeline_parent(cfg), label=label)
    for row in out.rows:
        log_numbers(metrics, {f"{out.metric}/{row.method}": row.distance, f"nfe/{row.method}": row.nfe})
    report_table(report, out)
    return out.eval_uri
