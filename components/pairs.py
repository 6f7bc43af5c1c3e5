"""KFP step: generate reflow (noise seed, sample) pairs from a checkpoint."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from loomcfm_core import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pairs(config_yaml: str, overrides: list, checkpoint_uri: str, parent_run_id: str, metrics: Output[Metrics],
          dataset: Output[Dataset]) -> str:
    """Returns the pairs dataset URI; ``dataset`` points at it for lineage."""
    from loomcfm_core import stages
    from loomcfm_core.config import load_config_text
    from loomcfm_core.kfp_io import log_numbers, point_to

    out = stages.pairs(load_config_text(config_yaml, overrides), checkpoint_uri, parent_run_id or None)
    log_numbers(metrics, {"num_pairs": out.num_pairs})
    point_to(dataset, out.pairs_uri, method=out.method, num_pairs=out.num_pairs)
    return out.pairs_uri
