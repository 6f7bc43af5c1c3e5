"""How close each coupling gets to the optimal transport plan of the whole dataset.

On the digits train split, with a fixed noise set (one seed per point, as LOOM's table with K=1), the exact
optimal assignment (``linear_sum_assignment`` on the full N x N cost matrix) gives the lower bound. The
table reports each coupling's mean pair cost as a ratio to it:

- independent: random pairs with fresh noise (I-CFM);
- minibatch OT: the optimal assignment inside each minibatch of fresh noise (OT-CFM), averaged over an epoch;
- LOOM after e epochs: the table's mean cost, which only ever goes down.

A second table shows what the size of the assignment problem does to LOOM (``coupling.max_problem``): the
global batch split into 4 or 16 groups solved separately (what ranks do above the cap: each solves its own
slice), and problems spanning the union of 2 or 4 consecutive batches of an epoch (what a cap of 2x or 4x
the global batch does), against the plain one-batch problem.

Run: ``python benchmarks/coupling.py [--epochs 1 5 10 30] [--batch-sizes 64 128 256]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from loomcfm_core.config import load_config
from loomcfm_core.coupling import SeedCoupling, noise_from_seeds
from loomcfm_core.coupling_solve import cost_matrix
from loomcfm_core.data.cache import cache_dataset
from loomcfm_core.data.dataset import ShardedDataset


def digits_train() -> torch.Tensor:
    with tempfile.TemporaryDirectory() as tmp:
        uri = cache_dataset(load_config("digits", [f"storage.root={tmp}"])).uri
        dataset = ShardedDataset(uri, "train")
        return torch.stack([dataset[i][0] for i in range(len(dataset))])


def epoch_batches(n: int, batch: int, rng: np.random.Generator):
    order = rng.permutation(n)
    for start in range(0, n - batch + 1, batch):
        yield torch.from_numpy(order[start:start + batch])


def mean_batch_cost(kind: str, data: torch.Tensor, batch: int, seed: int) -> float:
    coupling = SeedCoupling(kind, len(data), 1, tuple(data.shape[1:]), seed=seed)
    costs = [coupling.couple(data[idx], idx)[1].cost_after
             for idx in epoch_batches(len(data), batch, np.random.default_rng(seed))]
    return float(np.mean(costs))


def loom_costs(data: torch.Tensor, batch: int, checkpoints: list[int], seed: int, groups: int = 1,
               span: int = 1) -> dict[int, float]:
    """The table's mean cost after each epoch in ``checkpoints``: one problem per batch split into ``groups``
    pieces (the cap at batch/groups), or per ``span`` consecutive batches (the cap at span x batch)."""
    cap = batch // groups if groups > 1 else batch * span
    coupling = SeedCoupling("loom", len(data), 1, tuple(data.shape[1:]), seed=seed, max_problem=cap)
    rng = np.random.default_rng(seed)
    out = {}
    for epoch in range(1, max(checkpoints) + 1):
        batches = list(epoch_batches(len(data), batch, rng))
        for start in range(0, len(batches), span):
            coupling.plan([(data[idx], idx) for idx in batches[start:start + span]])
        if epoch in checkpoints:
            out[epoch] = coupling.total_cost(data).item() / len(data)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 5, 10, 30])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = digits_train()
    start = time.perf_counter()
    # The fixed noise set: the seeds LOOM's table starts from (K=1), so every row below shares it.
    seeds = SeedCoupling("loom", len(data), 1, tuple(data.shape[1:]), seed=args.seed).table[:, 0]
    costs = cost_matrix(data, noise_from_seeds(seeds, tuple(data.shape[1:]))).double().numpy()
    rows, cols = linear_sum_assignment(costs)
    optimal = costs[rows, cols].mean()
    print(f"\ndigits train split: {len(data)} points of {tuple(data.shape[1:])}; exact OT mean cost {optimal:.4f} "
          f"(full {len(data)}x{len(data)} assignment, {time.perf_counter() - start:.1f} s); "
          f"initial random pairing {np.trace(costs) / len(data):.4f}")
    print("mean pair cost / exact OT cost (1.000 = optimal)\n")
    header = ["batch", "independent", "minibatch OT"] + [f"LOOM {e} ep" for e in args.epochs]
    print("| " + " | ".join(f"{h:>12}" for h in header) + " |")
    print("|" + "|".join("-" * 14 for _ in header) + "|")
    for batch in args.batch_sizes:
        loom = loom_costs(data, batch, args.epochs, args.seed)
        cells = [mean_batch_cost("independent", data, batch, args.seed) / optimal,
                 mean_batch_cost("minibatch_ot", data, batch, args.seed) / optimal]
        cells += [loom[e] / optimal for e in args.epochs]
        print(f"| {batch:>12} | " + " | ".join(f"{c:>12.3f}" for c in cells) + " |")

    print("\nLOOM vs the size of its assignment problems (mean pair cost / exact OT cost)\n")
    header = ["batch", "problem"] + [f"{e} ep" for e in args.epochs]
    print("| " + " | ".join(f"{h:>16}" for h in header) + " |")
    print("|" + "|".join("-" * 18 for _ in header) + "|")
    for batch in args.batch_sizes:
        for label, groups, span in (("1 group", 1, 1), ("4 groups", 4, 1), ("16 groups", 16, 1),
                                    ("2 batches", 1, 2), ("4 batches", 1, 4)):
            if batch % groups:
                continue
            loom = loom_costs(data, batch, args.epochs, args.seed, groups, span)
            size = batch // groups * span
            cells = [f"{loom[e] / optimal:>16.4f}" for e in args.epochs]
            print(f"| {batch:>16} | {f'{label} of {size}':>16} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
