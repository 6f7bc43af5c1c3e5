"""LOOM-CFM training: the step, the resumable loop, and its launch on Ray Train.

``fit`` is the whole training loop for one rank; it uses ``torch.distributed`` when a process group exists
(Ray Train sets one up: gloo on CPU, NCCL on GPU) and runs alone otherwise. ``train`` launches it on a
``TorchTrainer`` — a local Ray on a laptop, the KubeRay cluster inside a RayJob — and is what the CLI, the
KFP component and the k8s RayJob call.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import mlflow
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from loomcfm_core import tracking
from loomcfm_core.checkpoint import latest_checkpoint, load_checkpoint, load_ema_weights, save_checkpoint
from loomcfm_core.config import Config, load_config_text
from loomcfm_core.coupling import Coupling, make_coupling
from loomcfm_core.data.dataset import ShardedDataset
from loomcfm_core.flow import cfm_loss, sample_t
from loomcfm_core.models.unet import UNetModel
from loomcfm_core.storage import absolute, join, storage_for

log = logging.getLogger(__name__)
RESULT_FILE = "result.json"


# ---- pieces of the step ----------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of the weights, updated every step; sampling uses these weights."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1.0 - self.decay)


def build_model(cfg: Config) -> UNetModel:
    return UNetModel.from_config(cfg.model, cfg.data.channels, cfg.data.resolution)


def warmup_lambda(warmup_steps: int):
    """Linear warm-up to the base LR, then constant (the paper's schedule)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor in rank order (the identity without a process group)."""
    if not _distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor on every rank (the identity without a process group)."""
    if _distributed():
        dist.broadcast(tensor, src=0)
    return tensor


@dataclass
class TrainState:
    """Everything a step touches; ``model`` may be DDP-wrapped, ``raw`` is the bare module."""

    cfg: Config
    model: torch.nn.Module
    raw: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    coupling: Coupling
    t_generator: torch.Generator
    device: torch.device
    step: int = 0


def build_state(cfg: Config, num_points: int, device: torch.device, rank: int = 0, world_size: int = 1,
                pair_seeds: torch.Tensor | None = None) -> TrainState:
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # dropout draws differ per rank, deterministically
    raw = build_model(cfg).to(device)
    model = raw
    if world_size > 1:
        model = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(raw.parameters(), lr=cfg.train.lr, betas=cfg.train.betas,
                                 weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(cfg.train.warmup_steps))
    shape = cfg.data.shape
    coupling = make_coupling(cfg.coupling.kind, num_points, cfg.coupling.num_seeds, shape, cfg.coupling.cost,
                             seed=cfg.train.seed, rank=rank, world_size=world_size, pair_seeds=pair_seeds)
    t_generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + rank + 1)
    return TrainState(cfg, model, raw, EMA(raw, cfg.train.ema_decay), optimizer, scheduler, coupling,
                      t_generator, device)


def train_step(state: TrainState, x1: torch.Tensor, index: torch.Tensor) -> dict:
    """One LOOM-CFM step: couple, regress the straight-path velocity, clip, Adam, EMA."""
    cfg = state.cfg.train
    x0, stats = state.coupling.couple(x1, index, gather=all_gather, broadcast=broadcast_from_rank0)
    t = sample_t(len(x1), state.device, state.t_generator)
    with torch.autocast(device_type=state.device.type, dtype=torch.bfloat16,
                        enabled=cfg.bf16 and state.device.type == "cuda"):
        loss = cfm_loss(state.model, x0, x1, t, cfg.sigma)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.raw.parameters(), cfg.grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    state.ema.update(state.raw)
    state.step += 1
    return {"loss": loss.detach(), "grad_norm": grad_norm.detach(), "cost_before": stats.cost_before,
            "cost_after": stats.cost_after, "swaps": stats.swaps}


# ---- data order ------------------------------------------------------------------------------------------

class GlobalBatchSampler(torch.utils.data.Sampler):
    """Per epoch, a permutation of the images shared by all ranks, cut into global batches; each rank takes
    its slice.

    An epoch visits each of the N images once; with ``hflip`` each is flipped with probability 1/2, i.e.
    served as data point ``i + N`` (the paper's protocol: a flipped image is its own point, yet an epoch is
    N images). No point repeats within a global batch (LOOM writes each point's seed back once) and the
    last incomplete batch is dropped, so every rank runs the same number of equal-sized steps. The order is
    a function of (seed, epoch) alone, which makes a mid-epoch resume land on the same batches.
    """

    def __init__(self, num_images: int, local_batch: int, rank: int, world_size: int, seed: int,
                 hflip: bool = False) -> None:
        self.num_images, self.local_batch, self.rank, self.world_size = num_images, local_batch, rank, world_size
        self.seed, self.hflip = seed, hflip
        self.steps_per_epoch = num_images // (local_batch * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"train.batch_size={local_batch} x {world_size} workers exceeds the dataset's "
                             f"{num_images} images")
        self.epoch, self.skip = 0, 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.steps_per_epoch - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.num_images)
        if self.hflip:
            order = order + self.num_images * rng.integers(0, 2, self.num_images)
        global_batch = self.local_batch * self.world_size
        for step in range(self.skip, self.steps_per_epoch):
            start = step * global_batch + self.rank * self.local_batch
            yield order[start:start + self.local_batch].tolist()


# ---- checkpoints -----------------------------------------------------------------------------------------

def _rng_state(state: TrainState) -> dict:
    rng = {"cpu": torch.get_rng_state(), "t": state.t_generator.get_state()}
    if state.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(state.device)
    return rng


def _gather_objects(obj) -> list:
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def table_hash(coupling: Coupling) -> str:
    table = getattr(coupling, "table", None)
    return hashlib.sha256(table.numpy().tobytes()).hexdigest()[:16] if table is not None else "-"


def _check_tables_agree(state: TrainState) -> list[str]:
    hashes = _gather_objects(table_hash(state.coupling))
    if len(set(hashes)) > 1:
        raise RuntimeError(f"coupling tables diverged across ranks at step {state.step}: {hashes}")
    return hashes


def checkpoint_state(state: TrainState, rank_rngs: list[dict], mlflow_run_id: str | None) -> dict:
    return {"step": state.step, "model": state.raw.state_dict(), "ema": state.ema.model.state_dict(),
            "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
            "coupling": state.coupling.state_dict(), "rng": rank_rngs, "config_yaml": state.cfg.to_yaml(),
            "mlflow_run_id": mlflow_run_id}


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
        if "cuda" in rng and state.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], state.device)


def initialise_from(state: TrainState, uri: str) -> None:
    """Start from another run's EMA weights (reflow starts from the LOOM model)."""
    weights = load_ema_weights(uri)
    state.raw.load_state_dict(weights)
    state.ema.model.load_state_dict(weights)


# ---- the loop --------------------------------------------------------------------------------------------

def default_run_name(cfg: Config, dataset_uri: str) -> str:
    digest = hashlib.sha256((cfg.digest("data", "model", "coupling", "train") + dataset_uri).encode())
    return f"{cfg.name}-{digest.hexdigest()[:10]}"


def run_uri_for(cfg: Config, dataset_uri: str) -> str:
    return join(absolute(cfg.storage.root), "runs", cfg.train.run_name or default_run_name(cfg, dataset_uri))


def fit(cfg: Config, dataset_uri: str, run_uri: str, device: torch.device, rank: int = 0, world_size: int = 1,
        parent_run_id: str | None = None) -> dict:
    """Train one rank to ``train.max_steps`` (or ``train.epochs``), resuming from the run's latest checkpoint.

    Rank 0 logs to MLflow and writes checkpoints; every rank must call this (collectives inside).
    Returns the final metrics (rank 0's view) including the checkpoint URI and every rank's table hash.
    """
    dataset = ShardedDataset(dataset_uri, "train", hflip=cfg.data.hflip, local_cache=cfg.data.local_cache)
    state = build_state(cfg, len(dataset), device, rank, world_size, dataset.pair_seeds)
    sampler = GlobalBatchSampler(dataset.num_images, cfg.train.batch_size, rank, world_size, cfg.train.seed,
                                 cfg.data.hflip)
    total_steps = cfg.train.max_steps or cfg.train.epochs * sampler.steps_per_epoch

    resume_uri, mlflow_run_id = latest_checkpoint(run_uri), None
    if resume_uri:
        ckpt = load_checkpoint(resume_uri, map_location="cpu")
        restore(state, ckpt, rank, world_size)
        mlflow_run_id = ckpt.get("mlflow_run_id")
        log.info("rank %d resumed from %s (step %d)", rank, resume_uri, state.step)
    elif cfg.train.init_from:
        initialise_from(state, cfg.train.init_from)

    # The loader gets its own generator: each new iterator draws a seed from it, and drawing from the global
    # one would shift the dropout stream after a resume.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=cfg.data.num_workers > 0,
                                         generator=torch.Generator().manual_seed(cfg.train.seed))
    tracker = _Tracker(cfg, state, rank, sampler.steps_per_epoch, parent_run_id,
                       {"loomcfm.run_uri": run_uri, "loomcfm.dataset_uri": dataset_uri}, resume_uri, mlflow_run_id)
    last_ckpt = resume_uri
    with tracker:
        bar = tqdm(total=total_steps, initial=state.step, disable=rank != 0, desc=f"train {cfg.name}",
                   unit="step", mininterval=2.0, dynamic_ncols=True)
        while state.step < total_steps:
            epoch, skip = divmod(state.step, sampler.steps_per_epoch)
            sampler.set_position(epoch, skip)
            for x1, _, index in loader:
                metrics = train_step(state, x1.to(device, non_blocking=True), index)
                tracker.step_done(metrics, len(x1) * world_size)
                bar.update(1)
                if state.step % cfg.train.checkpoint_every == 0 or state.step == total_steps:
                    last_ckpt = _save(state, run_uri, rank, tracker)
                if state.step >= total_steps:
                    break
        bar.close()
        if last_ckpt is None or not last_ckpt.endswith(f"step-{state.step:08d}.pt"):
            last_ckpt = _save(state, run_uri, rank, tracker)  # e.g. resumed at the end already
        hashes = _check_tables_agree(state)
        summary = {**tracker.last, "step": state.step, "checkpoint_uri": last_ckpt, "table_hashes": hashes,
                   "mlflow_run_id": tracker.run_id}
        if rank == 0:
            write_result(run_uri, summary)
        return summary


def write_result(run_uri: str, summary: dict) -> None:
    storage_for(run_uri).write_text(join(run_uri, RESULT_FILE), json.dumps(summary, indent=2))


def read_result(run_uri: str) -> dict:
    """The summary a finished run committed (what another process — a pipeline step — reads back)."""
    return json.loads(storage_for(run_uri).read_text(join(run_uri, RESULT_FILE)))


def _save(state: TrainState, run_uri: str, rank: int, tracker: _Tracker) -> str:
    rngs = _gather_objects(_rng_state(state))
    _check_tables_agree(state)
    uri = join(run_uri, "checkpoints", f"step-{state.step:08d}.pt")
    if rank == 0:
        uri = save_checkpoint(checkpoint_state(state, rngs, tracker.run_id), run_uri, state.step,
                              state.cfg.train.keep_checkpoints)
        tracker.checkpoint_saved(uri)
    if _distributed():
        dist.barrier()  # nobody resumes or finishes before the checkpoint is committed
    return uri


class _Tracker:
    """Rank 0's MLflow run for the train stage: params once, interval-averaged metrics, checkpoint URIs."""

    def __init__(self, cfg: Config, state: TrainState, rank: int, steps_per_epoch: int, parent_run_id: str | None,
                 tags: dict[str, str], resumed_from: str | None, run_id: str | None) -> None:
        self.cfg, self.state, self.rank, self.steps_per_epoch = cfg, state, rank, steps_per_epoch
        self.parent_run_id, self.tags, self.resumed_from, self.run_id = parent_run_id, tags, resumed_from, run_id
        self.last: dict = {}
        self._reset()

    def _reset(self) -> None:
        self.sums = {"loss": 0.0, "grad_norm": 0.0, "cost_before": 0.0, "cost_after": 0.0, "swaps": 0.0}
        self.count, self.images, self.started = 0, 0, time.perf_counter()

    def __enter__(self) -> _Tracker:
        if self.rank == 0:
            self._run = tracking.start_run(self.cfg, "train", parent_run_id=self.parent_run_id, tags=self.tags,
                                           run_id=self.run_id)
            self.run_id = self._run.__enter__().info.run_id
            if self.resumed_from is None:
                tracking.log_config(self.cfg)
            else:
                mlflow.set_tag("loomcfm.resumed_from", self.resumed_from)
        return self

    def __exit__(self, *exc) -> None:
        if self.rank == 0:
            self._run.__exit__(*exc)

    def step_done(self, metrics: dict, global_images: int) -> None:
        for key in self.sums:  # tensors stay on the device: no host sync until a log step
            self.sums[key] = self.sums[key] + metrics[key]
        self.count += 1
        self.images += global_images
        if self.state.step % self.cfg.train.log_every:
            return
        means = torch.tensor([float(self.sums[k]) / self.count for k in self.sums], dtype=torch.float64,
                             device=self.state.device)  # NCCL reduces device tensors only
        if _distributed():
            dist.all_reduce(means)
            means /= dist.get_world_size()
        elapsed = time.perf_counter() - self.started
        loss, grad_norm, before, after, swaps = means.cpu().tolist()
        self.last = {"train/loss": loss, "train/grad_norm": grad_norm, "coupling/cost_before": before,
                     "coupling/cost_after": after, "coupling/swaps": swaps,
                     "throughput/images_per_s": self.images / elapsed,
                     "train/lr": self.state.scheduler.get_last_lr()[0],
                     "train/epoch": self.state.step / self.steps_per_epoch}
        if self.rank == 0:
            mlflow.log_metrics(self.last, step=self.state.step)
        self._reset()

    def checkpoint_saved(self, uri: str) -> None:
        mlflow.set_tag("loomcfm.latest_checkpoint", uri)
        mlflow.log_metric("checkpoint/step", self.state.step, step=self.state.step)


# ---- launch on Ray Train ---------------------------------------------------------------------------------

@dataclass
class TrainResult:
    run_uri: str
    checkpoint_uri: str
    metrics: dict


def with_absolute_paths(cfg: Config) -> Config:
    """A copy whose local paths mean the same in a process with another working directory."""
    cfg = cfg.model_copy(deep=True)
    cfg.storage.root = absolute(cfg.storage.root)
    cfg.tracking.local_dir = absolute(cfg.tracking.local_dir)
    return cfg


def _check_local_resources(cfg: Config, available: dict) -> None:
    """On a local Ray nothing can scale up: fail now rather than wait forever for workers that cannot start."""
    cpus = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if cpus > available.get("CPU", 0):
        raise ValueError(f"ray.num_workers={cfg.ray.num_workers} x ray.cpus_per_worker={cfg.ray.cpus_per_worker} "
                         f"needs {cpus:g} CPUs, the local Ray has {available.get('CPU', 0):g}")
    if cfg.ray.use_gpu and cfg.ray.num_workers > available.get("GPU", 0):
        raise ValueError(f"ray.use_gpu with ray.num_workers={cfg.ray.num_workers} needs that many GPUs, the local "
                         f"Ray has {available.get('GPU', 0):g}")


def _ray_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    cfg = load_config_text(loop_config["config_yaml"])
    logging.basicConfig(level=logging.INFO)
    fit(cfg, loop_config["dataset_uri"], loop_config["run_uri"], ray.train.torch.get_device(),
        context.get_world_rank(), context.get_world_size(), loop_config.get("parent_run_id"))


def train(cfg: Config, dataset_uri: str, parent_run_id: str | None = None) -> TrainResult:
    """Train on Ray Train with ``ray.num_workers`` workers; reruns resume from the latest checkpoint."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = with_absolute_paths(cfg)  # Ray workers run in their own working directories
    run_uri = run_uri_for(cfg, dataset_uri)
    if not ray.is_initialized():
        ray.init(address=cfg.ray.address, logging_level=logging.WARNING)
    if cfg.ray.address is None:
        _check_local_resources(cfg, ray.cluster_resources())
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
    metrics = read_result(run_uri)
    return TrainResult(run_uri, metrics["checkpoint_uri"], metrics)
