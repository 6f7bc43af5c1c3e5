"""Data–noise couplings for flow matching, LOOM-CFM's among them, behind one interface.

LOOM ("Looking Out Of Minibatch") gives every data point K noise *seeds* (a flipped image is a point of its
own). Each step it picks one slot per minibatch item, regenerates that noise from its seed, solves the
minibatch assignment problem and writes the permuted seeds back, so good pairings found in one minibatch
survive into the next. Keeping the current pairing is always feasible, and pairs outside the minibatch are
untouched, hence the table's total transport cost never increases and the seeds are only ever permuted.

The table is ``int64 [num_points, K]``: small enough to live in memory on every rank (ImageNet with flips
and K=2 is 41 MB) and to go into every checkpoint. With several ranks, every rank gathers the global batch
and regenerates its noise; rank 0 solves the assignment and broadcasts it (a few bytes), and every rank
applies the same update, so the tables stay identical without ever being sent. (Solving on every rank
would rely on bit-identical float cost matrices across GPUs; one differing rounding in a near-tie would
split the tables.)

Kinds (all but ``pairs`` draw noise from seeds, so the machinery is shared):

=============  ===========================  ==================  ====================
kind           seeds                        reassign per batch  keep reassignments
=============  ===========================  ==================  ====================
independent    fresh every step             no                  —         (I-CFM)
minibatch_ot   fresh every step             yes                 no        (OT-CFM)
fixed          table, fixed                 no                  —
loom           table                        yes                 yes       (LOOM-CFM)
pairs          the dataset's                no                  —         (reflow)
=============  ===========================  ==================  ====================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from loomcfm_core.errors import CheckpointError, UsageError

Gather = Callable[[torch.Tensor], torch.Tensor]  # all ranks' tensors concatenated in rank order
Broadcast = Callable[[torch.Tensor], torch.Tensor]  # rank 0's tensor, on every rank
NoiseReader = Callable[[torch.Tensor], torch.Tensor]  # dataset indices -> their stored noise (CPU)
SEED_KINDS = ("independent", "minibatch_ot", "fixed", "loom")  # the kinds SeedCoupling implements
KINDS = (*SEED_KINDS, "pairs")  # coupling.kind
COSTS = ("l2", "sqeuclidean")  # coupling.cost: the distance, or its square

# splitmix64 constants as signed int64 (torch has no uint64 arithmetic; int64 multiplication wraps).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_U23, _U24 = 2.0**-23, 2.0**-24


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser: a bijective avalanche of 64-bit words."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def noise_from_seeds(seeds: torch.Tensor, shape: tuple[int, ...], device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise ``[len(seeds), *shape]``, a pure function of each seed, in one vectorised call.

    Counter-based: element pair j of seed s comes from splitmix64(mix(s) + (j+1)·golden), split into a
    23-bit and a 24-bit uniform and turned into two normals by Box–Muller. The integer stream is bit-identical on every
    device, so a seed means the same noise on a CPU and on a GPU (up to the last ulp of log/cos/sin), and a
    whole batch is generated on the training device instead of one CPU generator per sample plus a copy.
    """
    device = seeds.device if device is None else torch.device(device)
    numel = math.prod(shape)
    pairs = (numel + 1) // 2
    counters = torch.arange(1, pairs + 1, device=device, dtype=torch.int64) * _GOLDEN
    words = _mix64(_mix64(seeds.to(device=device, dtype=torch.int64))[:, None] + counters)
    u1 = _shr(words, 41).to(torch.float32).add_(0.5).mul_(_U23)  # exactly in (0, 1): log is finite
    angle = (words & 0xFFFFFF).to(torch.float32).mul_(2 * math.pi * _U24)
    radius = u1.log_().mul_(-2.0).sqrt_()
    normals = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :numel]
    return normals.reshape(len(seeds), *shape).to(dtype)


def random_seeds(count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(-(1 << 63), (1 << 63) - 1, (count,), generator=generator, dtype=torch.int64)


def cost_matrix(x1: torch.Tensor, x0: torch.Tensor, cost: str = "l2") -> np.ndarray:
    """cost[i, j] = ||x1_i - x0_j|| (or its square), in float64 so every rank gets the same matrix and the
    assignment's improvement is never lost to rounding."""
    dist = torch.cdist(x1.flatten(1).double()[None], x0.flatten(1).double()[None])[0]
    return (dist.square() if cost == "sqeuclidean" else dist).cpu().numpy()


@dataclass
class CouplingStats:
    """Mean pair cost before and after reassignment and the number of items whose noise changed."""

    cost_before: float
    cost_after: float
    swaps: int


class Coupling:
    """``couple`` maps a local minibatch of data (and its dataset indices) to the noise it is trained with."""

    kind = ""

    def couple(self, x1: torch.Tensor, index: torch.Tensor, gather: Gather | None = None,
               broadcast: Broadcast | None = None) -> tuple[torch.Tensor, CouplingStats]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"kind": self.kind}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise CheckpointError(f"checkpoint holds a {state.get('kind')!r} coupling, this run uses {self.kind!r}")


class PairsCoupling(Coupling):
    """Reflow: the dataset fixes each target's noise — stored as its seed (our pairs) or as the noise array
    itself (the reference's pairs, read by ``stored``) — and nothing is reassigned."""

    kind = "pairs"

    def __init__(self, seeds: torch.Tensor | None, shape: tuple[int, ...], cost: str = "l2",
                 stored: NoiseReader | None = None) -> None:
        if (seeds is None) == (stored is None):
            raise UsageError("the pairs coupling takes either the pairs' noise seeds or their stored noise")
        self.seeds, self.stored, self.shape, self.cost = seeds, stored, tuple(shape), cost

    def couple(self, x1, index, gather=None, broadcast=None):
        if self.stored is not None:
            x0 = self.stored(index.cpu()).to(x1.device, x1.dtype)
        else:
            x0 = noise_from_seeds(self.seeds[index.cpu()], self.shape, x1.device, x1.dtype)
        return x0, diagonal_stats(x1, x0, self.cost)


def diagonal_stats(x1: torch.Tensor, x0: torch.Tensor, cost: str) -> CouplingStats:
    """Stats of pairs that are not reassigned: the mean cost of the pairs as given."""
    dist = (x1 - x0).flatten(1).norm(dim=1)
    mean = (dist.square() if cost == "sqeuclidean" else dist).mean().item()
    return CouplingStats(mean, mean, 0)


class SeedCoupling(Coupling):
    """independent, minibatch_ot, fixed and loom: noise from seeds, optionally reassigned and remembered.

    All randomness (initial table, slot choice, fresh seeds) comes from one generator seeded identically on
    every rank and consumed identically, so ranks agree without communication beyond the batch gather.
    """

    def __init__(self, kind: str, num_points: int, num_seeds: int, shape: tuple[int, ...], cost: str = "l2",
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if kind not in SEED_KINDS:
            raise UsageError(f"SeedCoupling kind must be one of {', '.join(SEED_KINDS)}, got {kind!r}")
        self.kind, self.shape, self.cost = kind, tuple(shape), cost
        self.rank, self.world_size = rank, world_size
        self.fresh = kind in ("independent", "minibatch_ot")
        self.reassign = kind in ("minibatch_ot", "loom")
        self.generator = torch.Generator().manual_seed(seed)
        self.table = None if self.fresh else random_seeds(num_points * num_seeds, self.generator).view(
            num_points, num_seeds)

    def couple(self, x1, index, gather=None, broadcast=None):
        local = len(x1)
        total, mine = local * self.world_size, slice(self.rank * local, (self.rank + 1) * local)
        # Draw for the global batch on every rank, so the generators stay in step across ranks.
        if self.fresh:
            seeds = random_seeds(total, self.generator)
        else:
            slots = torch.randint(self.table.shape[1], (total,), generator=self.generator)
        if not self.reassign:
            seeds = seeds[mine] if self.fresh else self.table[index.cpu(), slots[mine]]
            x0 = noise_from_seeds(seeds, self.shape, x1.device, x1.dtype)
            return x0, diagonal_stats(x1, x0, self.cost)

        gather = gather or (lambda t: t)
        x1_all = gather(x1)
        index_all = gather(index.to(x1.device)).cpu()
        if not self.fresh:
            seeds = self.table[index_all, slots]
        x0_all = noise_from_seeds(seeds, self.shape, x1.device, x1.dtype)
        # Rank 0 decides; the assignment and its costs travel as one float64 vector (indices are exact).
        decision = torch.empty(total + 2, dtype=torch.float64)
        if self.rank == 0:
            costs = cost_matrix(x1_all, x0_all, self.cost)
            _, assignment = linear_sum_assignment(costs)
            identity = np.arange(total)
            decision[:total] = torch.from_numpy(assignment.astype(np.float64))
            decision[total:] = torch.tensor([costs[identity, identity].mean(), costs[identity, assignment].mean()])
        decision = (broadcast or (lambda t: t))(decision.to(x1.device)).cpu()
        perm = decision[:total].long()
        stats = CouplingStats(decision[total].item(), decision[total + 1].item(),
                              int((perm != torch.arange(total)).sum()))
        if self.kind == "loom":
            if len(torch.unique(index_all)) != total:
                raise UsageError("a LOOM minibatch must not repeat a data point (use a sampler without "
                                 "replacement that drops the last incomplete batch)")
            self.table[index_all, slots] = seeds[perm]
        return x0_all[perm.to(x1.device)][mine], stats

    def total_cost(self, data: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over the table of cost(x_i, noise(seed)) for every slot of the points ``index`` (default: all
        points, ``data[i]`` being point i); summing over chunks of points gives the whole table's cost."""
        flat = data.flatten(1).double()
        rows = self.table if index is None else self.table[index.cpu()]
        total = torch.zeros((), dtype=torch.float64, device=data.device)
        for slot in range(rows.shape[1]):
            noise = noise_from_seeds(rows[:, slot], self.shape, data.device).flatten(1).double()
            dist = (flat - noise).norm(dim=1)
            total += (dist.square() if self.cost == "sqeuclidean" else dist).sum()
        return total

    def state_dict(self) -> dict:
        return {"kind": self.kind, "table": self.table, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if not self.fresh:
            if state["table"].shape != self.table.shape:
                raise CheckpointError(f"checkpoint coupling table has shape {tuple(state['table'].shape)}, this run "
                                 f"needs {tuple(self.table.shape)} (num_points, num_seeds)")
            self.table = state["table"].clone()
        self.generator.set_state(state["generator"])


def make_coupling(kind: str, num_points: int, num_seeds: int, shape: tuple[int, ...], cost: str = "l2",
                  seed: int = 0, rank: int = 0, world_size: int = 1,
                  pair_seeds: torch.Tensor | None = None, pair_noise: NoiseReader | None = None) -> Coupling:
    if kind == "pairs":
        if pair_seeds is None and pair_noise is None:
            raise UsageError("coupling.kind=pairs needs a dataset of (noise, target) pairs: point data.uri "
                             "at the output of `loomcfm pairs`, or at reference pairs cached with a pairs: source")
        return PairsCoupling(pair_seeds, shape, cost, stored=pair_noise)
    if pair_seeds is not None or pair_noise is not None:
        raise UsageError(f"the dataset holds reflow pairs; train it with coupling.kind=pairs, not {kind!r}")
    return SeedCoupling(kind, num_points, num_seeds, shape, cost, seed, rank, world_size)
