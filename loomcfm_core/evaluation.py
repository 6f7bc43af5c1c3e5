"""The evaluate stage's work: sample with each method, score against the dataset, draw grids and a plot.

Every method samples from the same noise seeds, so differences between rows are the solver's and the
model's, not the noise's. Results are written to storage (``results.json``, ``results.md``, one grid per
method, ``fd_vs_nfe.png``), in a folder of their own per evaluation, so a KFP artifact or an MLflow run can
point at them.
"""

from __future__ import annotations

import hashlib
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


def output_uri_for(cfg: Config, checkpoint_uri: str, metric: str, methods: list[str], dataset_uri: str) -> str:
    """Where one evaluation's results go: ``<run>/eval/<checkpoint>/<metric>-n<samples>-<hash>`` for our runs
    (``<storage.root>/eval/<name>/...`` for outside checkpoints).

    The last part is keyed by what decides the numbers (metric, sample count, methods, dataset), so a second
    evaluation of the same checkpoint with other methods gets its own folder: nothing an earlier one wrote
    is overwritten or left beside results it does not belong to, and repeating one rewrites the same files.
    """
    run, sep, name = checkpoint_uri.rpartition("/checkpoints/")
    stem = name.rsplit(".", 1)[0] if sep else checkpoint_uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    base = join(run, "eval", stem) if sep else join(absolute(cfg.storage.root), "eval", stem)
    identity = {"metric": metric, "num_samples": cfg.eval.num_samples, "methods": methods, "dataset": dataset_uri}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return join(base, f"{metric}-n{cfg.eval.num_samples}-{digest}")


def _place_labels(ax, points: list[tuple[float, float, str]], color: str, below: bool, placed: list) -> None:
    """Label each point with its method, moving a label further out until it overlaps none in ``placed``
    (the curves of two models share NFE values, so fixed offsets would print labels on top of each other)."""
    renderer = ax.figure.canvas.get_renderer()
    for x, y, text in points:
        for step in range(12):
            dy = (-10 - 9 * step) if below else (5 + 9 * step)
            label = ax.annotate(text, (x, y), textcoords="offset points", xytext=(3, dy), fontsize=7, color=color,
                                va="top" if below else "bottom")
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            label.remove()
        placed.append(box)


def plot_fd_vs_nfe(curves: dict[str, list[MethodResult]], metric: str, path: Path) -> Path:
    """:func:`draw_fd_vs_nfe` saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = draw_fd_vs_nfe(curves, metric)
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_fd_vs_nfe(curves: dict[str, list[MethodResult]], metric: str):
    """One line per model: distance against NFE (log axis with the NFE values as plain ticks), each point
    labelled with its method, no two labels overlapping; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    curves = {label: sorted(rows, key=lambda r: r.nfe) for label, rows in curves.items()}
    lines = [ax.plot([r.nfe for r in rows], [r.distance for r in rows], marker="o", label=label)[0]
             for label, rows in curves.items()]
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sorted({r.nfe for rows in curves.values() for r in rows})))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.margins(x=0.12, y=0.18)
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(metric.upper() if metric == "fid" else metric)
    ax.set_title(f"{metric} vs NFE")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    placed: list = []
    for i, (line, rows) in enumerate(zip(lines, curves.values())):
        _place_labels(ax, [(r.nfe, r.distance, r.method) for r in rows], line.get_color(), i % 2 == 1, placed)
    return fig


def evaluate(cfg: Config, checkpoint_uri: str, dataset_uri: str, workdir: Path, methods: list[str] | None = None,
             output_uri: str | None = None, device: torch.device | None = None) -> Evaluation:
    """Score the checkpoint's EMA model with each method against the dataset's train statistics, sampling and
    extracting features on ``ray.num_workers`` workers (:mod:`loomcfm_core.generation`).

    A latent model's samples are decoded first: distances and grids are always of images, scored against
    the images a latent cache was encoded from. Grids, plot and tables are written to ``workdir`` (kept for
    the caller, e.g. to log them to MLflow) and uploaded to the evaluation's own folder
    (:func:`output_uri_for`), ``results.json`` last.
    """
    methods = methods or cfg.eval.methods
    images_uri = image_dataset_of(dataset_uri)
    network = feature_network(cfg, images_uri, device or default_device())
    reference = reference_stats(cfg, images_uri, network)
    output_uri = output_uri or output_uri_for(cfg, checkpoint_uri, network.metric, methods, dataset_uri)
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
         "images_uri": images_uri, "num_samples": cfg.eval.num_samples, "methods": methods, "latent_space": space,
         "rows": [asdict(r) for r in rows]}, indent=2))
    (workdir / "results.md").write_text(evaluation.table() + "\n")
    files += [workdir / "results.md", workdir / "results.json"]
    for path in files:  # results.json last: its presence means the evaluation is complete
        storage_for(output_uri).put(path, join(output_uri, path.name))
    return evaluation
