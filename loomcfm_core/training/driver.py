"""The driver of a training: ``run_on_ray`` runs ``fit`` on every worker of a Ray Train ``TorchTrainer`` after
the driver's own checks.

The driver is this process for ``--launcher local`` and the RayJob's head for ``--launcher rayjob``; its Ray is
a local one started here (:mod:`~loomcfm_core.training.local_ray`) or the KubeRay cluster
(``ray.address=auto``). In order, before any worker starts: the inputs are checked
(:mod:`~loomcfm_core.training.preflight`), the run folder's lease is taken (:mod:`loomcfm_core.lease`: one
training per folder), a resume is checked against the latest checkpoint, and the driver opens the stage's
MLflow run, which the workers log into. Reruns resume: every worker's ``fit`` continues from the run's latest
checkpoint.
"""

from __future__ import annotations

import json
import logging

import mlflow
from mlflow.tracking import MlflowClient

from loomcfm_core import provenance, run_record, tracking
from loomcfm_core.checkpoint import rewind
from loomcfm_core.config import Config, load_config_text
from loomcfm_core.data.manifest import read_manifest
from loomcfm_core.errors import StorageError
from loomcfm_core.layout import checkpoint_dir, convergence_uri, holders_uri, run_uri, with_absolute_paths
from loomcfm_core.lease import Lease
from loomcfm_core.processes import kept_signal_handlers
from loomcfm_core.run_status import Attempt, record_attempt
from loomcfm_core.storage import storage_for
from loomcfm_core.training.local_ray import clean_orphans, connect
from loomcfm_core.training.loop import fit
from loomcfm_core.training.preflight import Resume, check_inputs, plan_resume
from loomcfm_core.training.result import TrainResult, finished, read_result
from loomcfm_core.training.tracker import train_label

log = logging.getLogger(__name__)


def _ray_worker(loop_config: dict) -> None:
    """What every Ray Train worker runs: ``fit`` with its rank, world size and device from Ray."""
    import ray.train
    import ray.train.torch

    from loomcfm_core.training.ray_trainer import quiet_user_errors

    context = ray.train.get_context()
    logging.basicConfig(level=logging.INFO)
    quiet_user_errors()
    fit(load_config_text(loop_config["config_yaml"]), loop_config["dataset_uri"], loop_config["run_uri"],
        ray.train.torch.get_device(), context.get_world_rank(), context.get_world_size(),
        loop_config.get("parent_run_id"), loop_config.get("mlflow_run_id"), loop_config.get("lease_token"))


def _record_start(cfg: Config, resume: Resume, dataset_uri: str, earlier: Attempt | None) -> None:
    """On the driver's run: the config and dataset of a new run, or what a resume continues and changes: the
    attempt before it (how it ended, the last step it logged), and the schedule changes (MLflow params are
    immutable, so a changed schedule key is a new param ``<key>/step_<N>`` and a tag saying old -> new)."""
    run_record.log_dataset(dataset_uri, read_manifest(dataset_uri) or {}, context="training")
    if resume.checkpoint_uri is None:
        run_record.log_config(cfg, train_label(cfg))
        return
    mlflow.set_tag("loomcfm.resumed_from", resume.checkpoint_uri)
    if earlier is not None:
        record_attempt(MlflowClient(tracking.tracking_uri(cfg.tracking)), mlflow.active_run().info.run_id, earlier,
                       resume.step)
    for key, (old, new) in resume.schedule_changes.items():
        mlflow.set_tag(f"loomcfm.changed.{key}", f"{json.dumps(old)} -> {json.dumps(new)} at step {resume.step}")
        mlflow.log_param(f"{key}/step_{resume.step}", json.dumps(new))
        log.warning("%s changed from %s to %s at step %d (train.allow_changes)", key, old, new, resume.step)


def _abort_unfinished_uploads(run: str) -> None:
    """Housekeeping under the lease: the unfinished uploads of what only the lease holder writes (its
    checkpoints, the convergence table) are a killed training's. Best effort: a bucket policy without
    ``s3:ListBucketMultipartUploads`` leaves them to the bucket's lifecycle rule, and the training goes on."""
    for prefix in (checkpoint_dir(run), convergence_uri(run)):
        try:
            aborted = storage_for(prefix).abort_uploads(prefix)
        except StorageError as exc:
            log.warning("could not look for unfinished uploads under %s (%s): the bucket's lifecycle rule has to "
                        "remove them", prefix, exc)
            return
        if aborted:
            log.warning("%s: aborted %d unfinished upload(s) a killed training left", prefix, aborted)


def rewind_run(cfg: Config, dataset_uri: str, step: int, wait: bool = False) -> list[str]:
    """``--resume-step`` for a training that runs elsewhere (a RayJob): make step ``step``'s checkpoint the
    run's latest (:func:`~loomcfm_core.checkpoint.rewind`) under the run folder's lease, taken and released
    here before the RayJob exists. Its entrypoint then resumes from the latest, and so do KubeRay's retries of
    it: a retry never sets aside what a failed attempt trained after ``step``, and a training that holds the
    folder is never rewound under it (the lease refuses, or waits with ``wait``).

    Returns:
        Where the later checkpoints were moved.
    """
    run = run_uri(cfg, dataset_uri)
    with Lease(run, cfg.train.lease_seconds, wait=wait):
        return rewind(run, step)


def run_on_ray(cfg: Config, dataset_uri: str, parent_run_id: str | None = None, wait: bool = False,
               resume_step: int | None = None) -> TrainResult:
    """Train on Ray Train with ``ray.num_workers`` workers; reruns resume from the latest checkpoint.

    Args:
        wait: when another training holds the run folder, wait for it instead of failing.
        resume_step: first make step ``resume_step``'s checkpoint the latest, setting later ones aside
            (:func:`~loomcfm_core.checkpoint.rewind`; under the lease, before any worker starts).

    Returns:
        The result rank 0 committed to the run's ``result.json`` (Ray Train V2 keeps metrics only alongside
        Ray checkpoints).
    """
    from ray.train.v2.api.exceptions import TrainingFailedError

    from loomcfm_core.training.ray_trainer import LoomcfmTrainer, worker_error

    cfg = with_absolute_paths(cfg)  # Ray workers run in their own working directories
    tracking.check_reachable(tracking.tracking_uri(cfg.tracking))
    run = run_uri(cfg, dataset_uri)
    last_step = check_inputs(cfg, dataset_uri)
    with Lease(run, cfg.train.lease_seconds, wait=wait) as lease:
        if cfg.ray.address is None:
            # the local Ray of a killed training on this host may still be training into this folder: gone
            # before the resume is planned, or its next checkpoint would be what the workers resume from
            clean_orphans()
        _abort_unfinished_uploads(run)
        if resume_step is not None:
            rewind(run, resume_step)
        resume = plan_resume(cfg, dataset_uri, run)
        if resume.step >= last_step and finished(run) and read_result(run).checkpoint_uri == resume.checkpoint_uri:
            log.info("%s finished at step %d already (%s): nothing to train", run, resume.step, resume.checkpoint_uri)
            return read_result(run)
        stage = train_label(cfg)
        tags = {**run_record.stage_tags(cfg, stage), "loomcfm.run_uri": run, "loomcfm.dataset_uri": dataset_uri}
        earlier = Attempt.of(MlflowClient(tracking.tracking_uri(cfg.tracking)), resume.mlflow_run_id) \
            if resume.mlflow_run_id else None
        with tracking.start_run(cfg.tracking, cfg.experiment, provenance.run_name(cfg.name, stage), parent_run_id,
                                tags, run_id=resume.mlflow_run_id, holders=holders_uri(cfg)) as mlflow_run:
            _record_start(cfg, resume, dataset_uri, earlier)
            connect(cfg.ray)
            trainer = LoomcfmTrainer.of(cfg.ray, run.rsplit("/", 1)[-1], _ray_worker, {
                "config_yaml": cfg.to_yaml(), "dataset_uri": dataset_uri, "run_uri": run,
                "parent_run_id": parent_run_id, "mlflow_run_id": mlflow_run.info.run_id, "lease_token": lease.token})
            try:
                with kept_signal_handlers():  # fit replaces both (LoomcfmTrainer._register_sigint_handler)
                    trainer.fit()
            except TrainingFailedError as exc:
                raise worker_error(exc) from None  # the workers' tracebacks are in the log already
    return read_result(run)
