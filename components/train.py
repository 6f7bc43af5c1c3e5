"""KFP step: train (or reflow-train) in-process on Ray, or as a KubeRay RayJob on the cluster."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Metrics, Model, Output

from loomcfm_core import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(config_yaml: str, overrides: list, dataset_uri: str, parent_run_id: str, metrics: Output[Metrics],
          model: Output[Model], launcher: str = "local", namespace: str = "loomcfm", keep_cluster: bool = False,
          pairs_uri: str = "", init_from: str = "") -> NamedTuple("Trained", checkpoint_uri=str, run_uri=str):
    """``launcher``: ``local`` (Ray in this pod) or ``rayjob``; with ``pairs_uri`` it trains the reflow model
    initialised from ``init_from``."""
    from collections import namedtuple

    from loomcfm_core import stages
    from loomcfm_core.config import load_config_text
    from loomcfm_core.kfp_io import log_numbers, point_to

    out = stages.launch_train(load_config_text(config_yaml, overrides), dataset_uri, parent_run_id or None,
                              launcher, namespace, keep_cluster, pairs_uri, init_from)
    log_numbers(metrics, {**out.metrics, "step": out.step})
    point_to(model, out.checkpoint_uri, run_uri=out.run_uri, mlflow_run_id=out.mlflow_run_id,
             registered_version=out.model_version, alias=out.model_alias)
    return namedtuple("Trained", ["checkpoint_uri", "run_uri"])(out.checkpoint_uri, out.run_uri)
