"""One LOOM-CFM optimisation step and the state it touches: model, EMA, Adam, warm-up, coupling."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel

from loomcfm_core.config import Config
from loomcfm_core.coupling import Assigned, Coupling, NoiseReader, diagonal_stats, make_coupling
from loomcfm_core.data.latents import Targets
from loomcfm_core.flow import cfm_loss, sample_t
from loomcfm_core.models.loading import build_model
from loomcfm_core.noise import noise_from_seeds
from loomcfm_core.training.distributed import all_gather, broadcast_from_rank0


class EMA:
    """Exponential moving average of the weights, updated every step; sampling uses these weights."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1.0 - self.decay)


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the base LR, then constant (the paper's schedule)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


@dataclass
class TrainState:
    """Everything a step touches; ``model`` may be DDP-wrapped, ``raw`` is the bare module; ``targets`` turns a
    loaded batch into x1 (posterior draws for a latent cache)."""

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
    targets: Targets = field(default_factory=Targets)


def build_state(cfg: Config, num_points: int, device: torch.device, rank: int = 0, world_size: int = 1,
                pair_seeds: torch.Tensor | None = None, pair_noise: NoiseReader | None = None) -> TrainState:
    """A fresh state for one rank.

    Args:
        num_points: data points the coupling keeps seeds for (2N with flips).
        pair_seeds: the noise seed of every point of a reflow-pairs dataset (the ``pairs`` coupling).
        pair_noise: reads the stored noise of reflow pairs by index, for pairs that store noise arrays.
    """
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # dropout draws differ per rank, deterministically
    raw = build_model(cfg).to(device)
    model = raw
    if world_size > 1:
        model = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(raw.parameters(), lr=cfg.train.lr, betas=cfg.train.betas,
                                 weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(cfg.train.warmup_steps))
    shape = cfg.flow_shape
    coupling = make_coupling(cfg.coupling.kind, num_points, cfg.coupling.num_seeds, shape, cfg.coupling.cost,
                             seed=cfg.train.seed, rank=rank, world_size=world_size, pair_seeds=pair_seeds,
                             max_problem=cfg.coupling.max_problem, solver=cfg.coupling.solver, device=device,
                             pair_noise=pair_noise)
    t_generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + rank + 1)
    return TrainState(cfg, model, raw, EMA(raw, cfg.train.ema_decay), optimizer, scheduler, coupling,
                      t_generator, device)


def train_step(state: TrainState, x1: torch.Tensor, index: torch.Tensor, assigned: Assigned | None = None) -> dict:
    """One LOOM-CFM step: couple, regress the straight-path velocity, clip, Adam, EMA.

    Args:
        assigned: the batch's coupling when it was decided ahead (:mod:`loomcfm_core.training.pipelined`);
            without it the coupling is decided here.

    Returns:
        The step's loss, gradient norm and coupling statistics as tensors on the device: reading them on the
        host would synchronise every step, so the tracker does that only when it logs.
    """
    cfg = state.cfg.train
    if assigned is None:
        x0, stats = state.coupling.couple(x1, index, gather=all_gather, broadcast=broadcast_from_rank0)
    else:
        x0 = noise_from_seeds(assigned.seeds, state.coupling.shape, x1.device, x1.dtype)
        stats = assigned.stats or diagonal_stats(x1, x0, state.cfg.coupling.cost)
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
