"""Sample quality against NFE for the coupling ablation's arms trained with the same budget and seed.

On the embedded digits, each arm of the ablation pipeline (:data:`loomcfm_core.choices.ABLATION_ARMS`: I-CFM,
OT-CFM, fixed pairs, LOOM-CFM, LOOM-CFM after convergence; each arm's config is the pipeline's,
:func:`~loomcfm_core.ablation.arm_config`) trains the same network for the same steps from the same seed;
the table gives ``fd_digits`` (Fréchet distance on the digits classifier's features; lower is better) at
each sampling method with its NFE, and the curvature of the sampled paths (0 = straight, which a one-step
sampler follows exactly). The paper's claim to check: LOOM beats independent coupling at low NFE, where the
gap is largest. (The ablation pipeline's test checks its structure at a budget too small to tell the arms
apart; this is where their quality is compared.)

Run: ``python benchmarks/quality.py [--set train.max_steps=200 ...] [--plot quality.png]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from loomcfm_core import stages
from loomcfm_core.ablation import LABELS, arm_config
from loomcfm_core.choices import ABLATION_ARMS
from loomcfm_core.config import load_config
from loomcfm_core.coupling import noise_from_seeds
from loomcfm_core.evaluation.plot import plot_fd_vs_nfe
from loomcfm_core.evaluation.scoring import evaluate
from loomcfm_core.models.loading import load_model
from loomcfm_core.sampling import path_curvature, sample_seeds
from loomcfm_core.training.loop import fit

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--methods", nargs="+", default=["euler-1", "euler-2", "euler-4", "euler-8", "dopri5-1"])
    parser.add_argument("--plot", default="quality_fd_vs_nfe.png", help="where to write the FD-vs-NFE plot")
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        base = load_config("digits", [f"storage.root={tmp}/store", f"tracking.local_dir={tmp}/runs",
                                      *args.overrides])
        dataset_uri = stages.cache(base).dataset_uri
        results, curvature, minutes = {}, {}, {}
        for kind in ABLATION_ARMS:
            cfg = arm_config(base, kind)
            start = time.perf_counter()
            trained = fit(cfg, dataset_uri, f"{tmp}/store/runs/quality-{kind}", torch.device("cpu"))
            minutes[kind] = (time.perf_counter() - start) / 60
            workdir = Path(tmp) / f"eval-{kind}"
            workdir.mkdir()
            results[kind] = evaluate(cfg, trained.checkpoint_uri, dataset_uri, workdir, args.methods).rows
            model = load_model(cfg, trained.checkpoint_uri, torch.device("cpu"))
            shape = cfg.data.shape
            curvature[kind] = path_curvature(model, noise_from_seeds(sample_seeds(500), shape))
        plot = plot_fd_vs_nfe(results, "fd_digits", Path(args.plot))

    steps = base.train.max_steps or f"{base.train.epochs} epochs"
    print(f"\ndigits, {steps} per coupling, batch {base.train.batch_size}, seed {base.train.seed}, "
          f"{base.eval.num_samples} samples per method; fd_digits (lower is better), NFE in brackets\n")
    header = ["coupling", *args.methods, "curvature", "train min"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for kind in ABLATION_ARMS:
        cells = [f"{r.distance:.3f} ({r.nfe:.0f})" for r in results[kind]]
        print(f"| {LABELS.get(kind, kind)} | " + " | ".join(cells) + f" | {curvature[kind]:.4f} | {minutes[kind]:.1f} |")
    print(f"\nplot: {plot.resolve()}")


if __name__ == "__main__":
    main()
