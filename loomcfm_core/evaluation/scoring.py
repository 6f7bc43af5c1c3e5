"""The evaluate stage's work: sample with each method, score against the dataset, draw grids and a plot.

Every method samples from the same noise seeds, so differences between rows are the solver's and the
model's, not the noise's. Results are written to storage (``results.json``, ``results.md``, one grid per
method, ``fd_vs_nfe.png``), in a folder of their own per evaluation, so a KFP artifact or an MLflow run can
point at them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from loomcfm_core.config import Config
from loomcfm_core.data.latents import image_dataset_of
from loomcfm_core.evaluation.feature_weights import classifier_uri, train_dataset_classifier
from loomcfm_core.evaluation.metrics import FeatureStats, frechet_distance, reference_stats
from loomcfm_core.evaluation.plot import plot_fd_vs_nfe
from loomcfm_core.evaluation.samples import HEAD, feature_network, sample_methods
from loomcfm_core.layout import evaluation_uri
from loomcfm_core.models.loading import default_device
from loomcfm_core.results import MethodResult
from loomcfm_core.sampling import sample_seeds, save_grid
from loomcfm_core.storage import join, storage_for


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


def prepare_reference(cfg: Config, images_uri: str) -> float | None:
    """What evaluating against a newly cached image dataset needs beside it, made at cache time: for the
    digits classifier (``Config.feature_network``), the classifier, trained on the train split unless stored
    already, and the train split's reference statistics. Inception's statistics of a large train split are
    left to the first evaluation, which has a GPU.

    Returns:
        The classifier's accuracy on the val split when it was trained now (a poor classifier makes a poor
        metric), else None.
    """
    if cfg.feature_network != "classifier":
        return None
    accuracy = None
    if not storage_for(images_uri).exists(classifier_uri(images_uri)):
        accuracy = train_dataset_classifier(images_uri, cfg.data.local_cache, cfg.train.seed)
    reference_stats(images_uri, feature_network(cfg, images_uri), cfg.data.local_cache)
    return accuracy


def evaluate(cfg: Config, checkpoint_uri: str, dataset_uri: str, workdir: Path, methods: list[str] | None = None,
             output_uri: str | None = None, device: torch.device | None = None) -> Evaluation:
    """Score the checkpoint's EMA model with each method against the dataset's train statistics, sampling and
    extracting features on ``ray.num_workers`` workers (:mod:`loomcfm_core.evaluation.samples`).

    A latent model's samples are decoded first: distances and grids are always of images, scored against
    the images a latent cache was encoded from. Grids, plot and tables are written to ``workdir`` (kept for
    the caller, e.g. to log them to MLflow) and uploaded to the evaluation's own folder
    (:func:`loomcfm_core.layout.evaluation_uri`), ``results.json`` last.
    """
    methods = methods or cfg.eval.methods
    images_uri = image_dataset_of(dataset_uri)
    network = feature_network(cfg, images_uri, device or default_device())
    reference = reference_stats(images_uri, network, cfg.data.local_cache)
    output_uri = output_uri or evaluation_uri(cfg, checkpoint_uri, network.metric, methods, dataset_uri)
    sampled, space = sample_methods(cfg, checkpoint_uri, images_uri, methods, sample_seeds(cfg.eval.num_samples),
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
