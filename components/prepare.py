"""Validate the config and overrides before any stage runs, and open the pipeline's parent MLflow run."""

from typing import NamedTuple

from kfp import dsl

from loomcfm_core import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare(config_yaml: str, overrides: list) -> NamedTuple("Prepared", config_yaml=str, parent_run_id=str):
    """Resolved config YAML (what every later step trains and evaluates with) and the parent run id, which
    the later steps find by this pipeline run's id rather than take as an input (it would defeat caching).
    In a KFP pod a config that keeps data or runs on the pod's disk fails here, naming the keys."""
    from loomcfm_core.offline import stay_offline

    stay_offline()
    from collections import namedtuple

    from loomcfm_core import stages
    from loomcfm_core.config import load_config_text

    cfg = load_config_text(config_yaml, overrides)
    parent_run_id = stages.start_pipeline_run(cfg)
    return namedtuple("Prepared", ["config_yaml", "parent_run_id"])(cfg.to_yaml(), parent_run_id)
