"""KFP step: train (or reflow-train) in-process on Ray, or as a KubeRay RayJob on the cluster."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Metrics, Model, Output

from loomcfm_core import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(config_yaml: str, overrides: list, dataset_uri: str, metrics: Output[Metrics],
          model: Output[Model], launcher: str = "local", namespace: str = "loomcfm", keep_cluster: bool = False,
          pairs_uri: str = "", init_from: str = "", kfp_run_id: str = "", kfp_task: str = "", image: str = "",
          ray_workers: int = 1, gpus_per_worker: int = 0, worker_cpu: str = "4", worker_memory: str = "8Gi",
          gpu_node_selector: str = "nvidia.com/gpu.present=true") -> NamedTuple("Trained", checkpoint_uri=str,
                                                                                run_uri=str):
    """``launcher``: ``local`` (Ray in this pod) or ``rayjob``; with ``pairs_uri`` it trains the reflow model
    initialised from ``init_from``. The RayJob's cluster shape, image (empty: the package's; the pipelines pass
    theirs), namespace and ``keep_cluster`` become the config's ``kube.*`` (which also derives its ``ray.*``);
    ``kfp_run_id`` and ``kfp_task`` (the run's and this task's placeholders) name the RayJob, so a retry of
    this step adopts it instead of starting another. Defaults are literals: KFP runs this function's source
    alone, without this module's names."""
    from loomcfm_core.offline import stay_offline

    stay_offline()
    from collections import namedtuple

    from loomcfm_core import stages
    from loomcfm_core.config import load_config_text
    from loomcfm_core.kfp_env import pipeline_parent
    from loomcfm_core.kfp_io import log_numbers, point_to
    from loomcfm_core.kube.settings import as_overrides

    kube = as_overrides(namespace=namespace, keep_cluster=keep_cluster, image=image or None,
                        ray_workers=ray_workers, gpus_per_worker=gpus_per_worker, worker_cpu=worker_cpu,
                        worker_memory=worker_memory, gpu_node_selector=gpu_node_selector)
    cfg = load_config_text(config_yaml, [*overrides, *kube])
    out = stages.train(cfg, dataset_uri, pipeline_parent(cfg), launcher=launcher, pairs_uri=pairs_uri,
                       init_from=init_from, kfp_run_id=kfp_run_id, kfp_task=kfp_task)
    log_numbers(metrics, {**out.metrics, "step": out.step})
    point_to(model, out.checkpoint_uri, run_uri=out.run_uri, mlflow_run_id=out.mlflow_run_id,
             registered_version=out.model_version, alias=out.model_alias)
    return namedtuple("Trained", ["checkpoint_uri", "run_uri"])(out.checkpoint_uri, out.run_uri)
