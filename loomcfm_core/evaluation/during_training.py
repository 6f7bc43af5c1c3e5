"""Evaluation during training: every ``eval.every_steps`` steps (and at the last) the EMA model is scored
with a cheap method and sample count (``eval.during_training``), so a training run's chart shows quality, not
only loss, and a checkpoint can be picked by it.

Every rank samples its share of the seeds and takes the features (so the pause is the evaluation's time
divided by the number of workers, and no rank idles at the next collective while one works); rank 0 gathers
the features, computes the distance and keeps the first images for the grid. The seeds are the same at
every evaluation step (the evaluation stage's first ones), so the curve shows the model changing, not the
noise; sampling draws from its own per-seed generators, so the training's random streams, and with them a
resumed run, are untouched.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loomcfm_core.checkpoint import load_checkpoint
from loomcfm_core.config import Config
from loomcfm_core.data.latents import image_dataset_of
from loomcfm_core.data.manifest import read_manifest
from loomcfm_core.errors import MetricsError, UsageError
from loomcfm_core.evaluation.metrics import FeatureStats, frechet_distance, reference_stats
from loomcfm_core.evaluation.samples import HEAD, feature_network
from loomcfm_core.sampling import generate, sample_seeds, save_grid, to_uint8
from loomcfm_core.training.distributed import barrier, gather_objects
from loomcfm_core.workers import worker_ranges

log = logging.getLogger(__name__)


@dataclass
class Score:
    """One evaluation during training: the distance (``metric``: ``fd_digits``, ``fid``) and a sample grid."""

    metric: str
    method: str
    distance: float
    grid: object  # a PIL image

    @property
    def key(self) -> str:
        """The training run's metric: ``during_training/<metric>/<method>`` (step = training step)."""
        return f"during_training/{self.metric}/{self.method}"


def reference_images(cfg: Config, dataset_uri: str) -> str | None:
    """The image dataset a training's samples are compared with: its own images (a latent cache's), or for
    reflow pairs those of the dataset the generating checkpoint (``train.init_from``) was trained on."""
    manifest = read_manifest(dataset_uri) or {}
    if manifest.get("kind") != "pairs":
        return image_dataset_of(dataset_uri)
    trained_on = load_checkpoint(cfg.train.init_from).get("dataset_uri") if cfg.train.init_from else None
    return image_dataset_of(trained_on) if trained_on else None


class DuringTraining:
    """The evaluations of one rank's training (every rank builds one and calls :meth:`score` at the same steps).

    Latent models are not scored during training: their samples would have to be decoded by the autoencoder,
    which a training does not load.
    """

    def __init__(self, cfg: Config, dataset_uri: str, device: torch.device, last_step: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.cfg, self.device, self.rank, self.last_step = cfg, device, rank, last_step
        self.every = cfg.eval.every_steps if cfg.eval.every_steps and last_step >= cfg.eval.every_steps else 0
        if not self.every:
            return
        images = None if cfg.is_latent else reference_images(cfg, dataset_uri)
        try:
            if images is None:
                raise UsageError("a latent model" if cfg.is_latent else f"no image dataset behind {dataset_uri}")
            self.network = feature_network(cfg, images, device)
        except (MetricsError, UsageError) as exc:  # the training itself does not need it: say so, and train
            log.warning("eval.every_steps=%d: no evaluation during this training: %s", self.every, exc)
            self.every = 0
            return
        if rank == 0:  # computed once and stored beside the images, if the cache stage did not already
            self.reference = reference_stats(images, self.network, cfg.data.local_cache)
        barrier()
        if rank != 0:
            self.reference = reference_stats(images, self.network, cfg.data.local_cache)
        seeds = sample_seeds(cfg.eval.during_training.num_samples)
        ranges = worker_ranges(len(seeds), cfg.eval.batch_size, world_size)
        self.seeds = seeds[ranges[rank].start:ranges[rank].stop] if rank < len(ranges) else seeds[:0]

    def due(self, step: int) -> bool:
        """Whether this step is an evaluation step: every ``eval.every_steps``, and the last of a training that
        long (a shorter one is not evaluated while it trains)."""
        return bool(self.every) and (step % self.every == 0 or step == self.last_step)

    @torch.no_grad()
    def score(self, model: torch.nn.Module) -> Score | None:
        """Score ``model`` (the EMA network); every rank calls this, rank 0 gets the result (others None)."""
        method = self.cfg.eval.during_training.method
        features, head = np.zeros((0, 0), np.float32), None
        if len(self.seeds):
            samples = generate(model, self.cfg.flow_shape, method, self.seeds, self.cfg.eval.batch_size, self.device,
                               desc=f"evaluate {method}")
            images = to_uint8(samples.images)
            features, head = self.network.features(images).astype(np.float32), images[:HEAD]
        gathered = gather_objects(features)
        if self.rank != 0:
            return None
        stats = FeatureStats.of(np.concatenate([f for f in gathered if len(f)]))
        distance = frechet_distance(stats.mu, stats.sigma, self.reference.mu, self.reference.sigma)
        from PIL import Image

        with tempfile.TemporaryDirectory(prefix="loomcfm-during-") as tmp:
            save_grid(head, Path(tmp) / "grid.png", nrow=8)
            grid = Image.open(Path(tmp) / "grid.png").copy()
        return Score(self.network.metric, method, float(distance), grid)
