"""The evaluate stage's work: sample with each method, score against the dataset, draw grids and a plot.

Every method samples from the same noise seeds, so differences between rows are the solver's and the
model's, not the noise's. Results are written to storage (``results.json``, ``results.md``, one grid per
method, ``fd_vs_nfe.png``) so a KFP artifact or an MLflow run can point at them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from loomcfm_core.config import Config
from loomcfm_core.data.latents import image_dataset_of
from loomcfm_core.generation import HEAD, eval_on_workers
from loomcfm_core.metrics import FeatureStats, feature_network, frechet_distance, reference_stats
from loomcfm_core.models.loading import default_device
from loomcfm_core.sampling import sample_seeds, save_grid
from loomcfm_core.storage import absolute, join, storage_for


@dataclass
class MethodResult:
    method: str
    nfe: float
    distance: float
    seconds: float


@dataclass
class Evaluation:
    metric: str                 # "fid" or "fd_<dataset>"
    rows: list[MethodResult]
    output_uri: str
    files: list[Path]           # local copies of what was written to output_uri (for MLflow artifacts)
    latent_space: dict | None = None  # a latent model's autoencoder identity and scale

    def table(self) -> str:
        lines = [f"| method | NFE | {self.metric} | seconds |", "|---|---|---|---|"]
        lines += [f"| {r.method} | {r.nfe:.1f} | {r.distance:.3f} | {r.seconds:.1f} |" for r in self.rows]
        return "\n".join(lines)


def output_uri_for(cfg: Config, checkpoint_uri: str) -> str:
    """``<run>/eval/<checkpoint name>`` for our runs, ``<storage.root>/eval/<name>`` for outside checkpoints."""
    run, sep, name = checkpoint_uri.rpartition("/checkpoints/")
    stem = name.rsplit(".", 1)[0] if sep else checkpoint_uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return join(run, "eval", stem) if sep else join(absolute(cfg.storage.root), "eval", stem)


def plot_fd_vs_nfe(curves: dict[str, list[MethodResult]], metric: str, path: Path) -> Path:
    """One line per model: distance against NFE (log axis), each point labelled with its method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, rows in curves.items():
        rows = sorted(rows, key=lambda r: r.nfe)
        ax.plot([r.nfe for r in rows], [r.distance for r in rows], marker="o", label=label)
        for r in rows:
            ax.annotate(r.method, (r.nfe, r.distance), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(metric.upper() if metric == "fid" else metric)
    ax.set_title(f"{metric} vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def evaluate(cfg: Config, checkpoint_uri: str, dataset_uri: str, workdir: Path, methods: list[str] | None = None,
             output_uri: str | None = None, device: torch.device | None = None) -> Evaluation:
    """Score the checkpoint's EMA model with each method against the dataset's train statistics, sampling and
    extracting features on ``ray.num_workers`` workers (:mod:`loomcfm_core.generation`).

    A latent model's samples are decoded first: distances and grids are always of images, scored against
    the images a latent cache was encoded from. Grids, plot and tables are written to ``workdir`` (kept for
    the caller, e.g. to log them to MLflow) and uploaded to ``output_uri``.
    """
    methods = methods or cfg.eval.methods
    output_uri = output_uri or output_uri_for(cfg, checkpoint_uri)
    images_uri = image_dataset_of(dataset_uri)
    network = feature_network(cfg, images_uri, device or default_device())
    reference = reference_stats(cfg, images_uri, network)
    sampled, space = eval_on_workers(cfg, checkpoint_uri, images_uri, methods, sample_seeds(cfg.eval.num_samples),
                                     device)
    rows, files = [], []
    for method in methods:
        kept = sampled[method]
        stats = FeatureStats.of(np.concatenate(kept.features))
        distance = frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)
        rows.append(MethodResult(method, float(np.mean(kept.nfes)), distance, kept.seconds))
        grid = workdir / f"samples_{method}.png"
        save_grid(torch.cat(kept.head)[:HEAD], grid, nrow=8)
        files.append(grid)
    evaluation = Evaluation(network.metric, rows, output_uri, files, space)
    files.append(plot_fd_vs_nfe({cfg.name: rows}, network.metric, workdir / "fd_vs_nfe.png"))
    (workdir / "results.json").write_text(json.dumps(
        {"metric": network.metric, "checkpoint_uri": checkpoint_uri, "dataset_uri": dataset_uri,
         "images_uri": images_uri, "num_samples": cfg.eval.num_samples, "latent_space": space,
         "rows": [asdict(r) for r in rows]}, indent=2))
    (workdir / "results.md").write_text(evaluation.table() + "\n")
    files += [workdir / "results.md", workdir / "results.json"]
    for path in files:  # results.json last: its presence means the evaluation is complete
        storage_for(output_uri).put(path, join(output_uri, path.name))
    return evaluation
