"""What evaluation during training (``eval.every_steps``) costs a training, at the digits preset's settings.

1. The parts: the median training step (digits preset, batch 128) and one evaluation during training
   (``eval.during_training``: 1,000 samples with euler-2, their classifier features and the Fréchet distance
   against the cached reference statistics), and from them the share of a training the evaluations take at
   several ``eval.every_steps``.
2. End to end: the same ``fit`` (rank 0, no Ray) of ``--steps`` steps with evaluation every ``--every`` steps
   and with none, wall time of each and the difference, on a local MLflow store.

The evaluation is shared among Ray Train's workers (each samples its part of the seeds), so with W workers
its pause is about a W-th of the single-process one measured here.
Run: ``python benchmarks/eval_during_training.py [--steps 400 --every 200 --repeats 20]`` (``--steps 0``: the
parts only).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loomcfm_core import stages
from loomcfm_core.config import load_config
from loomcfm_core.data.dataset import ShardedDataset
from loomcfm_core.evaluation.during_training import DuringTraining
from loomcfm_core.training.loop import fit
from loomcfm_core.training.step import build_state, train_step


def median_seconds(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def parts(cfg, dataset_uri: str, repeats: int) -> tuple[float, float]:
    """(seconds per training step, seconds per evaluation during training)."""
    device = torch.device("cpu")
    dataset = ShardedDataset(dataset_uri, "train")
    state = build_state(cfg, len(dataset), device, 0, 1, dataset.pair_seeds, None)
    batch = torch.stack([dataset[i][0] for i in range(cfg.train.batch_size)])
    index = torch.arange(cfg.train.batch_size)
    step = median_seconds(lambda: train_step(state, batch, index, None), repeats)
    evaluator = DuringTraining(cfg, dataset_uri, device, last_step=cfg.eval.every_steps)
    evaluation = median_seconds(lambda: evaluator.score(state.ema.model), max(3, repeats // 5))
    return step, evaluation


def end_to_end(cfg, dataset_uri: str, root: Path, steps: int, every: int) -> float:
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.train.max_steps, run_cfg.eval.every_steps, run_cfg.train.checkpoint_every = steps, every, steps
    start = time.perf_counter()
    fit(run_cfg, dataset_uri, str(root / f"runs/every-{every}"), torch.device("cpu"))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="loomcfm-bench-") as tmp:
        root = Path(tmp)
        cfg = load_config("digits", [f"storage.root={root}/store", f"tracking.local_dir={root}/mlflow",
                                     f"data.local_cache={root}/node", "tracking.system_metrics_seconds=0"])
        dataset_uri = stages.cache(cfg).dataset_uri  # with the classifier and reference statistics
        step, evaluation = parts(cfg, dataset_uri, args.repeats)
        during = cfg.eval.during_training
        print(f"\ndigits preset, CPU ({torch.get_num_threads()} threads): a step {step * 1e3:.0f} ms (batch "
              f"{cfg.train.batch_size}); one evaluation during training {evaluation:.2f} s ({during.num_samples} "
              f"samples, {during.method})\n")
        print("| eval.every_steps | evaluation share of the training |\n|---|---|")
        for every in (50, 100, 200, 500):
            print(f"| {every} | {evaluation / (evaluation + every * step) * 100:.1f} % |")
        if not args.steps:
            return
        off = end_to_end(cfg, dataset_uri, root, args.steps, 0)
        on = end_to_end(cfg, dataset_uri, root, args.steps, args.every)
        print(f"\nend to end, fit of {args.steps} steps (rank 0, no Ray, local MLflow store):\n")
        print("| evaluation | seconds | vs none |\n|---|---|---|")
        print(f"| none | {off:.1f} | |")
        print(f"| every {args.every} steps ({args.steps // args.every} evaluations) | {on:.1f} | "
              f"{(on - off) / off * 100:+.1f} % |")


if __name__ == "__main__":
    main()
