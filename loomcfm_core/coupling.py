"""Data–noise couplings for flow matching, LOOM-CFM's among them, behind one interface.

LOOM ("Looking Out Of Minibatch") gives every data point K noise *seeds* (a flipped image is a point of its
own). Each step it picks one slot per minibatch item, regenerates that noise from its seed, solves the
minibatch assignment problem and writes the permuted seeds back, so good pairings found in one minibatch
survive into the next. Keeping the current pairing is always feasible, and pairs outside the minibatch are
untouched, hence the table's total transport cost never increases and the seeds are only ever permuted.

The table is ``int64 [num_points, K]``: small enough to live in memory on every rank (ImageNet with flips
and K=2 is 41 MB) and to go into every checkpoint. One assignment problem covers at most ``max_problem``
items (solving costs ~n^2.5, see :mod:`loomcfm_core.coupling_solve`):

- global batch <= max_problem: one problem, the paper's method. Ranks gather the batch, rank 0 solves and
  broadcasts the assignment, and every rank applies the same update, so the tables stay identical without
  ever being sent (solving on every rank would rely on bit-identical float costs across devices).
- a multiple of the global batch fits (LOOM only): the union of the next few global batches is one problem
  (they are disjoint within an epoch), trained on in turn: a bigger problem for the same training batch.
- global batch > max_problem: every rank solves its own local batch (in pieces of at most max_problem),
  with no images or noise gathered; the ranks exchange only (point, slot, new seed) per item.

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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from loomcfm_core.choices import SEED_COUPLINGS
from loomcfm_core.coupling_solve import assign, pair_costs
from loomcfm_core.errors import CheckpointError, TrainingError, UsageError
from loomcfm_core.noise import noise_from_seeds, random_seeds

Gather = Callable[[torch.Tensor], torch.Tensor]  # all ranks' tensors concatenated in rank order
Broadcast = Callable[[torch.Tensor], torch.Tensor]  # rank 0's tensor, on every rank
NoiseReader = Callable[[torch.Tensor], torch.Tensor]  # dataset indices -> their stored noise (CPU)


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class CouplingStats:
    """Mean pair cost before and after reassignment and the number of items whose noise changed."""

    cost_before: float | torch.Tensor
    cost_after: float | torch.Tensor
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
    """Stats of pairs that are not reassigned: the mean cost of the pairs as given (a tensor on their device,
    read only when the tracker logs)."""
    mean = pair_costs(x1, x0, cost).mean()
    return CouplingStats(mean, mean, 0)


@dataclass
class Assigned:
    """One local batch's coupling: the seed of the noise each item trains with, and the step's statistics
    (``None`` for kinds that do not reassign: the caller measures the pairs where the noise is)."""

    seeds: torch.Tensor
    stats: CouplingStats | None


class SeedCoupling(Coupling):
    """independent, minibatch_ot, fixed and loom: noise from seeds, optionally reassigned and remembered.

    All randomness (initial table, slot choice, fresh seeds) comes from one generator seeded identically on
    every rank and consumed identically, so ranks agree without communication beyond the batch gather.

    Args:
        max_problem: the most items one assignment problem may have (``None``: the global batch, always).
        solver: ``choices.ASSIGNMENT_SOLVERS``.
        device: where noise and cost matrices are computed (default: the data's device).
    """

    def __init__(self, kind: str, num_points: int, num_seeds: int, shape: tuple[int, ...], cost: str = "l2",
                 seed: int = 0, rank: int = 0, world_size: int = 1, max_problem: int | None = None,
                 solver: str = "lapjv", device: torch.device | str | None = None) -> None:
        if kind not in SEED_COUPLINGS:
            raise UsageError(f"SeedCoupling kind must be one of {', '.join(SEED_COUPLINGS)}, got {kind!r}")
        self.kind, self.shape, self.cost = kind, tuple(shape), cost
        self.rank, self.world_size = rank, world_size
        self.max_problem, self.solver = max_problem, solver
        self.device = None if device is None else torch.device(device)
        self.fresh = kind in ("independent", "minibatch_ot")
        self.reassign = kind in ("minibatch_ot", "loom")
        self.generator = torch.Generator().manual_seed(seed)
        self.table = None if self.fresh else random_seeds(num_points * num_seeds, self.generator).view(
            num_points, num_seeds)

    def span(self, local_batch: int) -> int:
        """How many consecutive global batches one assignment problem covers: for LOOM as many as fit the
        cap; always 1 for minibatch OT, whose problem is the minibatch by definition (OT-CFM)."""
        total = local_batch * self.world_size
        return max(1, self.max_problem // total) if self.kind == "loom" and self.max_problem else 1

    def couple(self, x1, index, gather=None, broadcast=None):
        assigned = self.plan([(x1, index)], gather, broadcast)[0]
        x0 = noise_from_seeds(assigned.seeds, self.shape, x1.device, x1.dtype)
        return x0, assigned.stats or diagonal_stats(x1, x0, self.cost)

    def plan(self, batches: list[tuple[torch.Tensor, torch.Tensor]], gather: Gather | None = None,
             broadcast: Broadcast | None = None) -> list[Assigned]:
        """Decide the noise of consecutive local batches ``(x1, index)`` of one epoch, in order, as one problem
        (or, above the cap, one local problem per rank); every rank calls this with its slice of each."""
        gather, broadcast = gather or _same, broadcast or _same
        local = len(batches[0][0])
        total = local * self.world_size
        mine = slice(self.rank * local, (self.rank + 1) * local)
        # Draw for the global batch on every rank, so the generators stay in step across ranks.
        draws = [random_seeds(total, self.generator) if self.fresh else
                 torch.randint(self.table.shape[1], (total,), generator=self.generator) for _ in batches]
        if not self.reassign:
            return [Assigned(d[mine] if self.fresh else self.table[index.cpu(), d[mine]], None)
                    for d, (_, index) in zip(draws, batches)]
        if self.max_problem is None or total * len(batches) <= self.max_problem:
            return self._plan_global(batches, draws, gather, broadcast, mine)
        if len(batches) > 1:
            raise UsageError(f"{len(batches)} global batches of {total} exceed coupling.max_problem="
                             f"{self.max_problem}: only batches that fit together are planned together")
        return [self._plan_local(*batches[0], draws[0], gather, mine)]

    def _device(self, x1: torch.Tensor) -> torch.device:
        return self.device or x1.device

    def _check_unique(self, index: torch.Tensor) -> None:
        if self.kind == "loom" and len(torch.unique(index)) != len(index):
            raise UsageError("a LOOM minibatch must not repeat a data point (use a sampler without "
                             "replacement that drops the last incomplete batch)")

    def _plan_global(self, batches, draws, gather, broadcast, mine) -> list[Assigned]:
        """One problem over the union of the global batches: rank 0 solves it and broadcasts the decision."""
        device = batches[0][0].device
        x1_all = torch.cat([gather(x1) for x1, _ in batches])
        index_all = torch.cat([gather(index.to(device)).cpu() for _, index in batches])
        drawn = torch.cat(draws)
        seeds = drawn if self.fresh else self.table[index_all, drawn]
        self._check_unique(index_all)
        n, total = len(index_all), len(draws[0])
        # Rank 0 decides; the assignment and each batch's (mean before, mean after, swaps) travel as one
        # float64 vector (indices are exact in float64).
        decision = torch.empty(n + 3 * len(batches), dtype=torch.float64)
        if self.rank == 0:
            solved = assign(x1_all, noise_from_seeds(seeds, self.shape, self._device(x1_all)), self.cost,
                            self.solver)
            decision[:n] = torch.from_numpy(solved.perm.astype(np.float64))
            moved = solved.perm != np.arange(n)
            for b in range(len(batches)):
                part = slice(b * total, (b + 1) * total)
                decision[n + 3 * b:n + 3 * b + 3] = torch.tensor(
                    [solved.before[part].mean(), solved.after[part].mean(), float(moved[part].sum())])
        decision = broadcast(decision.to(device)).cpu()
        new = seeds[decision[:n].long()]
        if self.kind == "loom":
            self.table[index_all, drawn] = new
        out = []
        for b in range(len(batches)):
            before, after, swaps = decision[n + 3 * b:n + 3 * b + 3].tolist()
            out.append(Assigned(new[b * total:(b + 1) * total][mine], CouplingStats(before, after, int(swaps))))
        return out

    def _plan_local(self, x1, index, drawn, gather, mine) -> Assigned:
        """Above the cap: this rank's batch is its own problem (in pieces of at most ``max_problem``); the
        ranks exchange (point, slot, new seed) per item and the sums of their pair costs."""
        local, index = len(x1), index.cpu()
        seeds = drawn[mine] if self.fresh else self.table[index, drawn[mine]]
        x0 = noise_from_seeds(seeds, self.shape, self._device(x1))
        perm, before, after = np.arange(local), np.zeros(local), np.zeros(local)
        for piece in np.array_split(np.arange(local), -(-local // self.max_problem)):
            solved = assign(x1[torch.from_numpy(piece)], x0[torch.from_numpy(piece)], self.cost, self.solver)
            perm[piece], before[piece], after[piece] = piece[solved.perm], solved.before, solved.after
        new = seeds[torch.from_numpy(perm)]
        sums = torch.tensor([before.sum(), after.sum()], dtype=torch.float64).view(torch.int64)
        swaps = torch.tensor([int((perm != np.arange(local)).sum())])
        packet = torch.cat([index, drawn[mine], new, sums, swaps])
        everything = gather(packet.to(x1.device)).cpu().view(self.world_size, 3 * local + 3)
        index_all, drawn_all, new_all = (everything[:, k * local:(k + 1) * local].flatten() for k in range(3))
        if not torch.equal(drawn_all, drawn):
            raise TrainingError("ranks drew different slots for one batch: their coupling generators diverged")
        self._check_unique(index_all)
        if self.kind == "loom":
            self.table[index_all, drawn_all] = new_all
        total_sums = everything[:, 3 * local:3 * local + 2].contiguous().view(torch.float64).sum(0) / len(drawn)
        return Assigned(new, CouplingStats(total_sums[0].item(), total_sums[1].item(),
                                           int(everything[:, -1].sum())))

    def total_cost(self, data: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over the table of cost(x_i, noise(seed)) for every slot of the points ``index`` (default: all
        points, ``data[i]`` being point i); summing over chunks of points gives the whole table's cost."""
        rows = self.table if index is None else self.table[index.cpu()]
        return sum(pair_costs(data, noise_from_seeds(rows[:, slot], self.shape, data.device), self.cost).sum()
                   for slot in range(rows.shape[1]))

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
                  seed: int = 0, rank: int = 0, world_size: int = 1, pair_seeds: torch.Tensor | None = None,
                  max_problem: int | None = None, solver: str = "lapjv", device: torch.device | str | None = None,
                  pair_noise: NoiseReader | None = None) -> Coupling:
    if kind == "pairs":
        if pair_seeds is None and pair_noise is None:
            raise UsageError("coupling.kind=pairs needs a dataset of (noise, target) pairs: point data.uri "
                             "at the output of `loomcfm pairs`, or at reference pairs cached with a pairs: source")
        return PairsCoupling(pair_seeds, shape, cost, stored=pair_noise)
    if pair_seeds is not None or pair_noise is not None:
        raise UsageError(f"the dataset holds reflow pairs; train it with coupling.kind=pairs, not {kind!r}")
    return SeedCoupling(kind, num_points, num_seeds, shape, cost, seed, rank, world_size, max_problem, solver,
                        device)
