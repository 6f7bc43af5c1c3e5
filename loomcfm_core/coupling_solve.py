"""One assignment problem of LOOM: the cost matrix on the training device, an exact solver on the host, and a
float64 check that keeps the seed table's total cost from ever rising.

The cost matrix is float32 and computed where the data is (a GPU does 1,024 x 1,024 x 3,072 in well under a
millisecond); it crosses to the host once, together with the noise, which is the step's one device-to-host
synchronisation. ``lapjv`` (Jonker-Volgenant, double-precision duals) is the default solver: measured by
``benchmarks/coupling_scale.py`` it is 5-10x faster than scipy's ``linear_sum_assignment`` on these dense
problems and both are exact. Ties may be broken differently by the two solvers, so a run is reproducible for a
given ``coupling.solver``, not across solvers.

A float32 optimum can be a float64 loss in a near-tie. The solver's permutation therefore goes through
:func:`keep_improving_cycles`: it is a union of disjoint cycles, each can be applied on its own, and a cycle is
kept only when it lowers the float64 cost of its pairs — so the table's total cost is non-increasing in float64,
not only up to float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lapjv
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from loomcfm_core.choices import ASSIGNMENT_SOLVERS
from loomcfm_core.errors import UsageError


def cost_matrix(x1: torch.Tensor, x0: torch.Tensor, cost: str = "l2") -> torch.Tensor:
    """cost[i, j] = ||x1_i - x0_j|| (or its square), float32, on the tensors' device."""
    dist = torch.cdist(x1.flatten(1).float(), x0.flatten(1).float())
    return dist.square() if cost == "sqeuclidean" else dist


def pair_costs(x1: torch.Tensor, x0: torch.Tensor, cost: str = "l2") -> torch.Tensor:
    """cost(x1_i, x0_i) for every row i, in float64: the numbers the table's invariant is stated in."""
    dist = (x1.flatten(1).double() - x0.flatten(1).double()).norm(dim=1)
    return dist.square() if cost == "sqeuclidean" else dist


def solve(costs: np.ndarray, solver: str = "lapjv") -> np.ndarray:
    """The optimal assignment of a square cost matrix: row i gets column ``result[i]``."""
    if solver == "lapjv":
        return lapjv.lapjv(np.ascontiguousarray(costs, dtype=np.float64), force_doubles=True)[0].astype(np.int64)
    if solver == "scipy":
        return linear_sum_assignment(costs)[1].astype(np.int64)
    raise UsageError(f"coupling.solver must be one of {', '.join(ASSIGNMENT_SOLVERS)}, got {solver!r}")


def cycle_labels(perm: np.ndarray) -> np.ndarray:
    """For every position, the smallest position on its cycle of ``perm`` (pointer doubling, vectorised)."""
    labels, jump = np.arange(len(perm)), perm.copy()
    for _ in range(max(1, math.ceil(math.log2(max(len(perm), 2)))) + 1):
        labels = np.minimum(labels, labels[jump])
        jump = jump[jump]
    return labels


def keep_improving_cycles(perm: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``perm`` with every cycle undone whose summed change ``delta`` (per position, float64) is not negative."""
    labels = cycle_labels(perm)
    keep = np.bincount(labels, weights=delta, minlength=len(perm))[labels] < 0
    return np.where(keep, perm, np.arange(len(perm)))


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """float32 tensors with equal row counts, on the CPU, after one device synchronisation for all of them."""
    remote = [t for t in tensors if t.device.type != "cpu"]
    if not remote:
        return list(tensors)
    packed = torch.cat([t.reshape(len(t), -1) for t in remote], dim=1).cpu()
    parts = iter(packed.split([t[0].numel() for t in remote], dim=1))
    return [t if t.device.type == "cpu" else next(parts).reshape(t.shape) for t in tensors]


@dataclass
class Assignment:
    """A solved problem: item i takes noise ``perm[i]``; each item's cost before and after (float32 entries)."""

    perm: np.ndarray
    before: np.ndarray
    after: np.ndarray

    @property
    def swaps(self) -> int:
        return int((self.perm != np.arange(len(self.perm))).sum())


def assign(x1: torch.Tensor, x0: torch.Tensor, cost: str = "l2", solver: str = "lapjv") -> Assignment:
    """Solve one problem between data ``x1`` (any device) and noise ``x0`` (on the device that computes the
    cost matrix), keeping only the cycles that improve the float64 cost of their pairs."""
    costs, x0_host, x1_host = to_host(cost_matrix(x1.to(x0.device, non_blocking=True), x0, cost), x0, x1)
    costs = costs.numpy()
    perm = solve(costs, solver)
    moved = np.flatnonzero(perm != np.arange(len(perm)))
    delta = np.zeros(len(perm))
    if len(moved):  # only moved items change cost: late in training, few do
        rows, cols = torch.from_numpy(moved), torch.from_numpy(perm[moved])
        delta[moved] = (pair_costs(x1_host[rows], x0_host[cols], cost) - pair_costs(x1_host[rows], x0_host[rows],
                                                                                    cost)).numpy()
    perm = keep_improving_cycles(perm, delta)
    return Assignment(perm, np.diagonal(costs).astype(np.float64), costs[np.arange(len(perm)), perm].astype(np.float64))
