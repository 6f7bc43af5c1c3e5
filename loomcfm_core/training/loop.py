"""``fit``: the whole training loop of one rank, resumable from the run's latest checkpoint.

A checkpoint holds every rank's RNG states and the coupling's table, and the batch order is a function of
(seed, epoch), so a resumed run ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from tqdm.auto import tqdm

from loomcfm_core.checkpoint import latest_checkpoint, load_checkpoint, load_ema_weights, save_checkpoint
from loomcfm_core.config import Config
from loomcfm_core.coupling import Coupling
from loomcfm_core.data.dataset import ShardedDataset
from loomcfm_core.data.latents import training_targets
from loomcfm_core.errors import TrainingError
from loomcfm_core.evaluation.during_training import DuringTraining
from loomcfm_core.layout import checkpoint_step, checkpoint_uri
from loomcfm_core.lease import check_held
from loomcfm_core.training.converge import converge, progress_run_id
from loomcfm_core.training.distributed import barrier, gather_objects
from loomcfm_core.training.pipelined import CouplingPlanner
from loomcfm_core.training.preflight import apply_schedule, check_resume, total_steps
from loomcfm_core.training.sampler import GlobalBatchSampler
from loomcfm_core.training.step import TrainState, build_state, train_step
from loomcfm_core.training.result import TrainResult, write_result
from loomcfm_core.training.tracker import Tracker

log = logging.getLogger(__name__)


# ---- checkpoints -----------------------------------------------------------------------------------------

def _rng_state(state: TrainState) -> dict:
    rng = {"cpu": torch.get_rng_state(), "t": state.t_generator.get_state(), **state.targets.rng_state()}
    if state.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(state.device)
    return rng


def table_hash(coupling: Coupling) -> str:
    """A short hash of the coupling's seed table (``-`` for couplings without one)."""
    table = getattr(coupling, "table", None)
    return hashlib.sha256(table.numpy().tobytes()).hexdigest()[:16] if table is not None else "-"


def _check_tables_agree(state: TrainState) -> list[str]:
    hashes = gather_objects(table_hash(state.coupling))
    if len(set(hashes)) > 1:
        raise TrainingError(f"coupling tables diverged across ranks at step {state.step}: {hashes}")
    return hashes


def checkpoint_state(state: TrainState, rank_rngs: list[dict], mlflow_run_id: str | None, dataset_uri: str) -> dict:
    """Everything a resume needs, ``rank_rngs`` being every rank's RNG states in rank order; the config and
    dataset it was trained with let a resume check that it continues the same training."""
    return {"step": state.step, "model": state.raw.state_dict(), "ema": state.ema.model.state_dict(),
            "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
            "coupling": state.coupling.state_dict(), "rng": rank_rngs, "config_yaml": state.cfg.to_yaml(),
            "mlflow_run_id": mlflow_run_id, "dataset_uri": dataset_uri, "latent_space": state.targets.space}


def restore(state: TrainState, ckpt: dict, rank: int, world_size: int) -> None:
    """Continue from a checkpoint loaded onto the CPU (RNG states and the seed table must stay there)."""
    state.raw.load_state_dict(ckpt["model"])
    state.ema.model.load_state_dict(ckpt["ema"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.coupling.load_state_dict(ckpt["coupling"])
    state.step = ckpt["step"]
    if len(ckpt["rng"]) != world_size:
        log.warning("checkpoint was written by %d ranks, this run has %d: training continues, but not exactly "
                    "as the original run would have (batch order and random streams differ)",
                    len(ckpt["rng"]), world_size)
    if rank < len(ckpt["rng"]):
        rng = ckpt["rng"][rank]
        torch.set_rng_state(rng["cpu"])
        state.t_generator.set_state(rng["t"])
        state.targets.set_rng_state(rng)
        if "cuda" in rng and state.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], state.device)


def initialise_from(state: TrainState, uri: str) -> None:
    """Start from another run's EMA weights (reflow starts from the LOOM model)."""
    weights = load_ema_weights(uri)
    state.raw.load_state_dict(weights)
    state.ema.model.load_state_dict(weights)


def _save(state: TrainState, run_uri: str, dataset_uri: str, rank: int, tracker: Tracker,
          lease_token: str | None) -> str:
    rngs = gather_objects(_rng_state(state))
    _check_tables_agree(state)
    uri = checkpoint_uri(run_uri, state.step)
    if rank == 0:
        if lease_token:
            check_held(run_uri, lease_token)
        uri = save_checkpoint(checkpoint_state(state, rngs, tracker.run_id, dataset_uri), run_uri, state.step,
                              state.cfg.train.keep_checkpoints)
        tracker.checkpoint_saved(uri)
    barrier()  # nobody resumes or finishes before the checkpoint is committed
    return uri


# ---- the loop --------------------------------------------------------------------------------------------

def fit(cfg: Config, dataset_uri: str, run_uri: str, device: torch.device, rank: int = 0, world_size: int = 1,
        parent_run_id: str | None = None, mlflow_run_id: str | None = None,
        lease_token: str | None = None) -> TrainResult:
    """Train one rank to ``train.max_steps`` (or ``train.epochs``), resuming from the run's latest checkpoint.

    Rank 0 logs to MLflow, writes checkpoints and commits the result to ``<run_uri>/result.json``; every
    rank must call this (collectives inside), and scores the EMA model every ``eval.every_steps``
    (:mod:`loomcfm_core.evaluation.during_training`). A resume must continue the same training
    (:func:`~loomcfm_core.training.preflight.check_resume`) and follows the current schedule.

    Args:
        mlflow_run_id: the MLflow run the driver opened for this training (rank 0 logs into it); without
            one, rank 0 opens its own (or reopens the checkpoint's).
        lease_token: the driver's lease on the run folder; rank 0 checks it is still held before it writes
            (:func:`~loomcfm_core.lease.check_held`).

    Returns:
        The result (rank 0's view): the final checkpoint, every rank's table hash, the last logged metrics.
    """
    dataset = ShardedDataset(dataset_uri, "train", hflip=cfg.data.hflip, local_cache=cfg.data.local_cache)
    state = build_state(cfg, len(dataset), device, rank, world_size, dataset.pair_seeds,
                        dataset.pair_noise if dataset.stored_noise else None)
    state.targets = training_targets(dataset, cfg.train.seed, rank)
    sampler = GlobalBatchSampler(dataset.num_images, cfg.train.batch_size, rank, world_size, cfg.train.seed,
                                 cfg.data.hflip)
    last_step = total_steps(cfg, dataset.num_images)

    resume_uri, run_id = latest_checkpoint(run_uri), mlflow_run_id
    if resume_uri:
        ckpt = load_checkpoint(resume_uri, map_location="cpu")
        check_resume(ckpt, resume_uri, cfg, dataset_uri)
        restore(state, ckpt, rank, world_size)
        apply_schedule(state)
        run_id = run_id or ckpt.get("mlflow_run_id")
        log.info("rank %d resumed from %s (step %d)", rank, resume_uri, state.step)
    elif cfg.train.init_from:
        initialise_from(state, cfg.train.init_from)
    if not resume_uri and cfg.coupling.converge_epochs:
        run_id = run_id or progress_run_id(run_uri)

    # The loader gets its own generator: each new iterator draws a seed from it, and drawing from the global
    # one would shift the dropout stream after a resume.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=cfg.data.num_workers > 0,
                                         generator=torch.Generator().manual_seed(cfg.train.seed))
    tracker = Tracker(cfg, state, rank, sampler.steps_per_epoch, parent_run_id,
                      {"loomcfm.run_uri": run_uri, "loomcfm.dataset_uri": dataset_uri}, resume_uri, run_id,
                      attach=mlflow_run_id is not None)
    evaluator = DuringTraining(cfg, dataset_uri, device, last_step, rank, world_size)
    planner = CouplingPlanner(state.coupling, cfg.train.batch_size, cfg.train.checkpoint_every, last_step,
                              cfg.coupling.pipelined, device, state.targets)
    last_ckpt = resume_uri
    with tracker:
        if cfg.coupling.converge_epochs and not resume_uri:
            converge(state, dataset, sampler, run_uri, rank, tracker.run_id, lease_token)
        bar = tqdm(total=last_step, initial=state.step, disable=rank != 0, desc=f"train {cfg.name}",
                   unit="step", mininterval=2.0, dynamic_ncols=True)
        while state.step < last_step:
            epoch, skip = divmod(state.step, sampler.steps_per_epoch)
            sampler.set_position(cfg.coupling.converge_epochs + epoch, skip)  # convergence used the first epochs
            for x1, index, assigned in planner.batches(loader, state.step):
                metrics = train_step(state, x1.to(device, non_blocking=True), index, assigned)
                tracker.step_done(metrics, len(x1) * world_size)
                if evaluator.due(state.step):
                    tracker.scored(evaluator.score(state.ema.model))
                bar.update(1)
                if state.step % cfg.train.checkpoint_every == 0 or state.step == last_step:
                    last_ckpt = _save(state, run_uri, dataset_uri, rank, tracker, lease_token)
                if state.step >= last_step:
                    break
        bar.close()
        if last_ckpt is None or checkpoint_step(last_ckpt) != state.step:
            last_ckpt = _save(state, run_uri, dataset_uri, rank, tracker, lease_token)  # e.g. resumed at the end already
        result = TrainResult(run_uri=run_uri, dataset_uri=dataset_uri, step=state.step, checkpoint_uri=last_ckpt,
                             mlflow_run_id=tracker.run_id, table_hashes=_check_tables_agree(state),
                             metrics=dict(tracker.last))
        if rank == 0:
            if lease_token:
                check_held(run_uri, lease_token)
            write_result(result)
        return result
