"""``run_on_ray``: ``fit`` on every worker of a Ray Train ``TorchTrainer``.

On a laptop that is a local Ray started here; inside a RayJob it is the KubeRay cluster (``ray.address=auto``).
Reruns resume: every worker's ``fit`` continues from the run's latest checkpoint.
"""

from __future__ import annotations

import logging

from loomcfm_core.config import Config, load_config_text
from loomcfm_core.errors import UsageError
from loomcfm_core.storage import absolute
from loomcfm_core.training.loop import fit, run_uri_for
from loomcfm_core.training.summary import TrainSummary, read_summary


def with_absolute_paths(cfg: Config) -> Config:
    """A copy whose local paths mean the same in a process with another working directory."""
    cfg = cfg.model_copy(deep=True)
    cfg.storage.root = absolute(cfg.storage.root)
    cfg.tracking.local_dir = absolute(cfg.tracking.local_dir)
    if cfg.eval.inception_weights:
        cfg.eval.inception_weights = absolute(cfg.eval.inception_weights)
    autoencoder = cfg.model.autoencoder
    if autoencoder is not None:  # generation workers decode with it
        autoencoder.weights = absolute(autoencoder.weights)
        autoencoder.config = autoencoder.config and absolute(autoencoder.config)
    return cfg


def check_local_resources(cfg: Config, available: dict) -> None:
    """On a local Ray nothing can scale up: fail now rather than wait forever for workers that cannot start.

    Args:
        available: the local Ray's ``ray.cluster_resources()``.
    """
    cpus = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if cpus > available.get("CPU", 0):
        raise UsageError(f"ray.num_workers={cfg.ray.num_workers} x ray.cpus_per_worker={cfg.ray.cpus_per_worker} "
                         f"needs {cpus:g} CPUs, the local Ray has {available.get('CPU', 0):g}")
    if cfg.ray.use_gpu and cfg.ray.num_workers > available.get("GPU", 0):
        raise UsageError(f"ray.use_gpu with ray.num_workers={cfg.ray.num_workers} needs that many GPUs, the local "
                         f"Ray has {available.get('GPU', 0):g}")


def connect(cfg: Config) -> None:
    """Join ``ray.address`` (or start a local Ray), checking that a local one can run the workers asked for."""
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.ray.address, logging_level=logging.WARNING)
    if cfg.ray.address is None:
        check_local_resources(cfg, ray.cluster_resources())


def _ray_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    cfg = load_config_text(loop_config["config_yaml"])
    logging.basicConfig(level=logging.INFO)
    fit(cfg, loop_config["dataset_uri"], loop_config["run_uri"], ray.train.torch.get_device(),
        context.get_world_rank(), context.get_world_size(), loop_config.get("parent_run_id"))


def run_on_ray(cfg: Config, dataset_uri: str, parent_run_id: str | None = None) -> TrainSummary:
    """Train on Ray Train with ``ray.num_workers`` workers; reruns resume from the latest checkpoint.

    Returns:
        The summary rank 0 committed to the run's ``result.json``.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_uri = run_uri_for(cfg, dataset_uri)  # named by the config as given (stages read the result back so)
    cfg = with_absolute_paths(cfg)  # Ray workers run in their own working directories
    connect(cfg)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"config_yaml": cfg.to_yaml(), "dataset_uri": dataset_uri, "run_uri": run_uri,
                           "parent_run_id": parent_run_id},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(name=run_uri.rsplit("/", 1)[-1],
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    # Ray Train V2 keeps metrics only alongside Ray checkpoints; rank 0 commits its summary to storage instead.
    return read_summary(run_uri)
