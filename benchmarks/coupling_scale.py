"""What LOOM's coupling costs per training step as the global batch grows, and what keeps it flat.

Everything runs on this machine's CPU, the host where the assignment is solved, on 3x32x32 images and noise
(the ImageNet-32 shape), local batches of 128 (W = global / 128 ranks). Times are the CPU time of the one
thread doing the work (torch set to one thread), so other load on a shared machine does not inflate them;
the pipelined wait is wall time, as the training thread experiences it.

1. Exact solvers on the same dense L2 problems: scipy's ``linear_sum_assignment`` and ``lapjv`` (the default,
   ``coupling.solver``); both find the optimum (their total costs are printed side by side).
2. Per step, for global batches of 128 ... 8192:
   - one global problem: cost matrix (float32) plus exact solve over the whole global batch — the method with
     no cap (timed once per size; skipped above ``--max-global``, where it takes minutes here);
   - bounded (``coupling.max_problem``): what one rank does per step — the global problem while it fits the
     cap (joined with the next batches when several fit), else its own local batch plus applying every rank's
     seed updates (the other ranks' update packets are built exactly as those ranks would send them);
   - pipelined: how long the training thread waits for the coupling per step when the decision runs on the
     host thread while a 100 ms step trains (a sleep stands in for a GPU busy with the step), in steady
     state. The target is under 3 ms (3 % of the step) at every size.

Here the cost matrices are computed by the CPU too; on a GPU they take well under a millisecond (see
``benchmarks/gpu.py``), so these times are upper bounds for a GPU run.

Run: ``python benchmarks/coupling_scale.py [--max-problem 1024] [--sizes 128 256 ... 8192]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from loomcfm_core import coupling as coupling_module
from loomcfm_core import coupling_solve
from loomcfm_core.coupling import SeedCoupling
from loomcfm_core.coupling_solve import assign, cost_matrix, solve
from loomcfm_core.noise import noise_from_seeds, random_seeds
from loomcfm_core.training.pipelined import CouplingPlanner

SHAPE, LOCAL, STEP_S = (3, 32, 32), 128, 0.1


def images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1] (neighbouring pixels correlated, as in photographs)."""
    x = torch.rand(n, 1, 3 * 32 * 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return (torch.nn.functional.avg_pool1d(x, 9, 1, 4)[:, 0] * 3).clamp(-1, 1).view(n, *SHAPE)


class DeviceWorkClock:
    """Adds up the time the coupling spends in cost matrices and noise generation: on a GPU that is device
    work (well under a millisecond each, see ``benchmarks/gpu.py``), the rest is what the host must do."""

    def __init__(self) -> None:
        self.seconds = 0.0
        for module, name in ((coupling_solve, "cost_matrix"), (coupling_module, "noise_from_seeds")):
            setattr(module, name, self._timed(getattr(module, name)))

    def _timed(self, fn):
        def timed(*args, **kwargs):
            start = time.thread_time()
            out = fn(*args, **kwargs)
            self.seconds += time.thread_time() - start
            return out
        return timed


def ms(fn, repeats: int = 1) -> float:
    """Median CPU time of ``fn`` on this thread, in ms: torch runs on one thread here, so this is the work
    itself, not inflated by other load on the machine."""
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append((time.thread_time() - start) * 1e3)
    return statistics.median(times)


def solver_table(sizes: list[int], scipy_max: int) -> None:
    print("\n## exact solvers on dense L2 problems (image x noise, float32 costs)\n")
    print(f"| {'n':>5} | {'cost matrix f64 ms':>18} | {'cost matrix f32 ms':>18} | {'scipy ms':>9} | "
          f"{'lapjv ms':>9} | {'scipy / lapjv':>13} | {'same optimum':>12} |")
    print("|" + "|".join("-" * w for w in (7, 20, 20, 11, 11, 15, 14)) + "|")
    for n in sizes:
        x1, x0 = images(n, n), noise_from_seeds(torch.arange(n), SHAPE)
        f64 = ms(lambda: torch.cdist(x1.flatten(1).double(), x0.flatten(1).double()), 1)
        f32 = ms(lambda: cost_matrix(x1, x0), 5 if n <= 1024 else 1)
        costs = cost_matrix(x1, x0).double().numpy()
        lap = ms(lambda: solve(costs, "lapjv"), 5 if n <= 1024 else 1)
        lap_total = costs[np.arange(n), solve(costs, "lapjv")].sum()
        if n <= scipy_max:
            sci = ms(lambda: linear_sum_assignment(costs), 3 if n <= 1024 else 1)
            rows, cols = linear_sum_assignment(costs)
            same = "yes" if abs(costs[rows, cols].sum() - lap_total) <= 1e-9 * lap_total else "NO"
            print(f"| {n:>5} | {f64:>18.1f} | {f32:>18.1f} | {sci:>9.1f} | {lap:>9.1f} | {sci / lap:>12.1f}x | "
                  f"{same:>12} |")
        else:
            print(f"| {n:>5} | {f64:>18.1f} | {f32:>18.1f} | {'-':>9} | {lap:>9.1f} | {'-':>13} | {'-':>12} |")
    print(f"\n(scipy skipped above {scipy_max}: seconds per solve here)")


class SimulatedRanks:
    """``all_gather`` as rank 0 of ``world`` ranks sees it above the cap: its own packet, then for every other
    rank the packet that rank would send (its points, the slots every rank drew, new seeds, its cost sums)."""

    def __init__(self, coupling: SeedCoupling, world: int, others: torch.Tensor) -> None:
        self.coupling, self.world, self.others = coupling, world, others

    def __call__(self, packet: torch.Tensor) -> torch.Tensor:
        local = (len(packet) - 3) // 3
        if len(packet) != 3 * local + 3 or self.world == 1:
            return packet  # not an update packet (nothing else is gathered above the cap)
        draws = self.drawn
        parts = [packet]
        for r in range(1, self.world):
            index = self.others[(r - 1) * local:r * local]
            parts.append(torch.cat([index, draws[r * local:(r + 1) * local], packet[2 * local:]]))
        return torch.cat(parts)

    def before_step(self) -> None:
        """The slots all ranks are about to draw for the next batch (a copy of the shared generator's draw)."""
        generator = torch.Generator()
        generator.set_state(self.coupling.generator.get_state())
        self.drawn = torch.randint(self.coupling.table.shape[1], (self.world * LOCAL,), generator=generator)


def rank_step_ms(global_batch: int, cap: int, data: torch.Tensor, clock: DeviceWorkClock,
                 steps: int = 5) -> tuple[float, float]:
    """One rank's coupling decision per training step under the cap: (all of it, its device work)."""
    world = global_batch // LOCAL
    totals, matrices = [], []
    if global_batch <= cap:
        span = cap // global_batch
        coupling = SeedCoupling("loom", len(data), 2, SHAPE, max_problem=cap)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))
        for step in range(2):
            unit = order[step * span * global_batch:(step + 1) * span * global_batch].view(span, global_batch)
            clock.seconds = 0.0
            totals.append(ms(lambda: coupling.plan([(data[idx], idx) for idx in unit])) / span)
            matrices.append(clock.seconds * 1e3 / span)
        return statistics.median(totals), statistics.median(matrices)
    coupling = SeedCoupling("loom", len(data), 2, SHAPE, world_size=world, max_problem=cap)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(2))
    for step in range(steps):
        start = step * global_batch % (len(data) - global_batch + 1)
        idx = order[start:start + global_batch]
        ranks = SimulatedRanks(coupling, world, idx[LOCAL:])
        ranks.before_step()
        clock.seconds = 0.0
        totals.append(ms(lambda: coupling.plan([(data[idx[:LOCAL]], idx[:LOCAL])], gather=ranks)))
        matrices.append(clock.seconds * 1e3)
    return statistics.median(totals), statistics.median(matrices)


def pipelined_wait_ms(global_batch: int, cap: int, data: torch.Tensor, units: int = 4) -> tuple[float, float]:
    """(mean, max) time the training thread waits per step in steady state (the first unit never overlaps)."""
    world = max(1, global_batch // LOCAL) if global_batch > cap else 1
    local = LOCAL if global_batch > cap else global_batch  # under the cap rank 0 solves the global batch
    coupling = SeedCoupling("loom", len(data), 2, SHAPE, world_size=world, max_problem=cap)
    planner = CouplingPlanner(coupling, local, checkpoint_every=10**9, total_steps=10**9, pipelined=True)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(3))
    others = order[len(order) - (world - 1) * LOCAL:]  # the other ranks' points, never rank 0's
    mine = order[:len(order) - len(others)]
    steps = planner.span * units
    loader = []
    for step in range(steps):
        start = step * local % (len(mine) - local + 1)
        idx = mine[start:start + local]
        loader.append((data[idx], None, idx))
    if world > 1:
        ranks = SimulatedRanks(coupling, world, others)
        planner.gather = ranks
        original = coupling.plan

        def plan(batches, gather=None, broadcast=None):
            ranks.before_step()
            return original(batches, gather, broadcast)

        coupling.plan = plan
    waits, it = [], planner.batches(loader, 0)
    for _ in range(steps):
        start = time.perf_counter()
        next(it)
        waits.append((time.perf_counter() - start) * 1e3)
        time.sleep(STEP_S)  # the device trains on this batch
    steady = waits[planner.span:]
    return statistics.mean(steady), max(steady)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--max-problem", type=int, default=1024, help="coupling.max_problem")
    parser.add_argument("--max-global", type=int, default=4096, help="largest global problem to time")
    parser.add_argument("--scipy-max", type=int, default=2048, help="largest problem to time scipy on")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"CPU time of one thread (torch on 1 thread), except the pipelined wait (wall time); images {SHAPE}; "
          f"local batch {LOCAL}; coupling.max_problem={args.max_problem}")
    solver_table([n for n in args.sizes if n <= args.max_global], args.scipy_max)

    data = images(3 * max(args.sizes) + 2 * args.max_problem, seed=1)
    clock = DeviceWorkClock()
    step_ms = STEP_S * 1e3
    print(f"\n## per training step, {step_ms:.0f} ms steps\n")
    print("| global batch | ranks | one global problem ms | bounded, per rank ms | of which device work ms | "
          "pipelined wait here ms (mean / max) | wait / step here | wait / step, device work on a GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        if size <= args.max_global:
            x1, x0 = images(size, size + 7), noise_from_seeds(random_seeds(size, torch.Generator()), SHAPE)
            whole = f"{ms(lambda: assign(x1, x0), 3 if size <= 1024 else 1):.1f}"
        else:
            whole = "(skipped)"
        bounded, matrices = rank_step_ms(size, args.max_problem, data, clock)
        mean, worst = pipelined_wait_ms(size, args.max_problem, data)
        # with noise and cost matrices on a GPU, the host thread's (bounded - matrices) ms hide behind the steps
        span = max(1, args.max_problem // size) if size <= args.max_problem else 1
        gpu_wait = max(0.0, (bounded - matrices) * span - step_ms * span) / span
        print(f"| {size} | {max(1, size // LOCAL)} | {whole} | {bounded:.1f} | {matrices:.1f} | "
              f"{mean:.2f} / {worst:.2f} | {mean / step_ms:.1%} | {gpu_wait / step_ms:.1%} |")
    print(f"\none global problem skipped above {args.max_global} (minutes on this CPU). Under the cap one problem "
          "covers cap // global consecutive batches, so its time is shared by that many steps. 'here': this CPU "
          "also does the device work (noise, cost matrices), which a GPU does in well under a millisecond; "
          "the last column is the wait that leaves: the host's share (solve, float64 check, seed updates) "
          "beyond the steps it overlaps.")


if __name__ == "__main__":
    main()
