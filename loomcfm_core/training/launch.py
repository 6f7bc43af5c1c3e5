"""``run_on_ray``: ``fit`` on every worker of a Ray Train ``TorchTrainer``, after the driver's own checks.

On a laptop that is a local Ray started here; inside a RayJob it is the KubeRay cluster (``ray.address=auto``).
In order, before any worker starts: the inputs are checked (:mod:`~loomcfm_core.training.preflight`), the
run folder's lease is taken (:mod:`loomcfm_core.lease`: one training per folder), a resume is checked
against the latest checkpoint, and the driver opens the stage's MLflow run, which the workers log into.
Reruns resume: every worker's ``fit`` continues from the run's latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import signal
import threading

import mlflow

from loomcfm_core import tracking
from loomcfm_core.config import Config, load_config_text
from loomcfm_core.checkpoint import rewind
from loomcfm_core.errors import UsageError
from loomcfm_core.lease import Lease
from loomcfm_core.storage import absolute, join, storage_for
from loomcfm_core.training.loop import fit, run_uri_for
from loomcfm_core.training.preflight import Resume, check_inputs, plan_resume
from loomcfm_core.training.summary import RESULT_FILE, TrainSummary, read_summary
from loomcfm_core.training.tracker import train_label

LOCATIONS = ("storage.root", "tracking.local_dir", "data.uri", "train.init_from", "eval.inception_weights")
log = logging.getLogger(__name__)


def with_absolute_paths(cfg: Config) -> Config:
    """A copy whose local paths mean the same in a process with another working directory."""
    cfg = cfg.model_copy(deep=True)
    for key in LOCATIONS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value:
            setattr(getattr(cfg, section), name, absolute(value))
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
    """Join ``ray.address`` (or start a local Ray, recorded and stopped by the CLI on signals and at exit),
    checking that a local one can run the workers asked for.

    ``ray.init`` replaces the SIGTERM handler with its own ``sys.exit(15)`` (``ray/_private/worker.py``,
    ``init``'s ``sigterm_handler``), which would end every later stage of the command without its MLflow run
    ending KILLED, its lease released or its local Ray stopped; the handlers that were there are put back.
    """
    import ray

    from loomcfm_core.training.local_ray import start_local_ray

    if not ray.is_initialized():
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        if cfg.ray.address is None:
            start_local_ray(logging_level=logging.WARNING)
        else:
            ray.init(address=cfg.ray.address, logging_level=logging.WARNING)
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    if cfg.ray.address is None:
        check_local_resources(cfg, ray.cluster_resources())


def _ray_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from loomcfm_core.training.ray_trainer import quiet_user_errors

    context = ray.train.get_context()
    cfg = load_config_text(loop_config["config_yaml"])
    logging.basicConfig(level=logging.INFO)
    quiet_user_errors()
    fit(cfg, loop_config["dataset_uri"], loop_config["run_uri"], ray.train.torch.get_device(),
        context.get_world_rank(), context.get_world_size(), loop_config.get("parent_run_id"),
        loop_config.get("mlflow_run_id"), loop_config.get("lease_token"))


def _record_start(cfg: Config, resume: Resume) -> None:
    """On the driver's run: the config of a new run, or what a resume continues and changes (MLflow params
    are immutable, so a changed schedule key is a new param ``<key>/step_<N>`` and a tag saying old -> new)."""
    if resume.checkpoint_uri is None:
        tracking.log_config(cfg)
        return
    mlflow.set_tag("loomcfm.resumed_from", resume.checkpoint_uri)
    for key, (old, new) in resume.schedule_changes.items():
        mlflow.set_tag(f"loomcfm.changed.{key}", f"{json.dumps(old)} -> {json.dumps(new)} at step {resume.step}")
        mlflow.log_param(f"{key}/step_{resume.step}", json.dumps(new))
        log.warning("%s changed from %s to %s at step %d (train.allow_changes)", key, old, new, resume.step)



def _train(cfg: Config, dataset_uri: str, run_uri: str, parent_run_id: str | None, run_id: str,
           lease_token: str) -> None:
    """Ray Train's part: start a local Ray if needed, run ``fit`` on the workers, turn a failure into one error."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig
    from ray.train.v2.api.exceptions import TrainingFailedError

    from loomcfm_core.training.ray_trainer import LoomcfmTrainer, worker_error

    connect(cfg)
    trainer = LoomcfmTrainer(
        _ray_worker,
        train_loop_config={"config_yaml": cfg.to_yaml(), "dataset_uri": dataset_uri, "run_uri": run_uri,
                           "parent_run_id": parent_run_id, "mlflow_run_id": run_id, "lease_token": lease_token},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(name=run_uri.rsplit("/", 1)[-1],
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
    )
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer.fit()  # replaces both handlers while it runs (LoomcfmTrainer._register_sigint_handler)
    except TrainingFailedError as exc:
        raise worker_error(exc) from None  # the workers' tracebacks are in the log already
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def _finished_at(run_uri: str, checkpoint_uri: str | None) -> bool:
    """Whether the run committed its summary for this checkpoint (a rerun of a finished training)."""
    store = storage_for(run_uri)
    if checkpoint_uri is None or not store.exists(join(run_uri, RESULT_FILE)):
        return False
    return read_summary(run_uri).checkpoint_uri == checkpoint_uri


def rewind_run(cfg: Config, dataset_uri: str, step: int, wait: bool = False) -> list[str]:
    """``--resume-step`` for a training that runs elsewhere (a RayJob): make step ``step``'s checkpoint the
    run's latest (:func:`~loomcfm_core.checkpoint.rewind`) under the run folder's lease, taken and released
    here before the RayJob exists. Its entrypoint then resumes from the latest, and so do KubeRay's retries of
    it: a retry never sets aside what a failed attempt trained after ``step``, and a training that holds the
    folder is never rewound under it (the lease refuses, or waits with ``wait``).

    Returns:
        Where the later checkpoints were moved.
    """
    run_uri = run_uri_for(cfg, dataset_uri)
    with Lease(run_uri, cfg.train.lease_seconds, wait=wait):
        return rewind(run_uri, step)


def run_on_ray(cfg: Config, dataset_uri: str, parent_run_id: str | None = None, wait: bool = False,
               resume_step: int | None = None) -> TrainSummary:
    """Train on Ray Train with ``ray.num_workers`` workers; reruns resume from the latest checkpoint.

    Args:
        wait: when another training holds the run folder, wait for it instead of failing.
        resume_step: first make step ``resume_step``'s checkpoint the latest, setting later ones aside
            (:func:`~loomcfm_core.checkpoint.rewind`; under the lease, before any worker starts).

    Returns:
        The summary rank 0 committed to the run's ``result.json``.
    """
    cfg = with_absolute_paths(cfg)  # Ray workers run in their own working directories
    run_uri = run_uri_for(cfg, dataset_uri)
    last_step = check_inputs(cfg, dataset_uri)
    with Lease(run_uri, cfg.train.lease_seconds, wait=wait) as lease:
        if resume_step is not None:
            rewind(run_uri, resume_step)
        resume = plan_resume(cfg, dataset_uri, run_uri)
        if resume.step >= last_step and _finished_at(run_uri, resume.checkpoint_uri):
            log.info("%s finished at step %d already (%s): nothing to train", run_uri, resume.step,
                     resume.checkpoint_uri)
            return read_summary(run_uri)
        tags = {"loomcfm.run_uri": run_uri, "loomcfm.dataset_uri": dataset_uri}
        with tracking.start_run(cfg, train_label(cfg), parent_run_id, tags, run_id=resume.mlflow_run_id) as run:
            _record_start(cfg, resume)
            _train(cfg, dataset_uri, run_uri, parent_run_id, run.info.run_id, lease.token)
    # Ray Train V2 keeps metrics only alongside Ray checkpoints; rank 0 commits its summary to storage instead.
    return read_summary(run_uri)
