"""KFP step: generate reflow (noise seed, sample) pairs from a checkpoint."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from loomcfm_core import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pairs(config_yaml: str, overrides: list, checkpoint_uri: str, metrics: Output[Metrics],
          dataset: Output[Dataset]) -> str:
    """Returns the pairs dataset URI; ``dataset`` points at it for lineage. Pairs of one checkpoint and
    config are always the same, so KFP may reuse this step."""
    from loomcfm_core.offline import stay_offline

    stay_offline()
    from loomcfm_core import stages
    from loomcfm_core.config import load_config_text
    from loomcfm_core.kfp_env import pipeline_parent
    from loomcfm_core.kfp_io import log_numbers, point_to

    cfg = load_config_text(config_yaml, overrides)
    out = stages.pairs(cfg, checkpoint_uri, pipeline_parent(cfg))
    log_numbers(metrics, {"num_pairs": out.num_pairs})
    point_to(dataset, out.pairs_uri, method=out.method, num_pairs=out.num_pairs)
    return out.pairs_uri
