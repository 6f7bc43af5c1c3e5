"""KFP step: cache the dataset as HDF5 shards in object storage."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from loomcfm_core import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def cache(config_yaml: str, overrides: list, metrics: Output[Metrics], dataset: Output[Dataset]) -> str:
    """Returns the dataset URI; ``dataset`` points at it for lineage. Its inputs are the config alone, so a
    rerun of the pipeline with the same config reuses this step (KFP caching)."""
    from loomcfm_core.offline import stay_offline

    stay_offline()
    from dataclasses import asdict

    from loomcfm_core import stages
    from loomcfm_core.config import load_config_text
    from loomcfm_core.kfp_env import pipeline_parent
    from loomcfm_core.kfp_io import log_numbers, point_to

    cfg = load_config_text(config_yaml, overrides)
    out = stages.cache(cfg, pipeline_parent(cfg))
    log_numbers(metrics, asdict(out))
    point_to(dataset, out.dataset_uri, num_train=out.num_train, num_val=out.num_val)
    return out.dataset_uri
