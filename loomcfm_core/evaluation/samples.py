"""Every method's samples for an evaluation, taken on ``ray.num_workers`` workers (:mod:`loomcfm_core.workers`)
and reduced there to what scoring needs: the features of the samples, the NFE of every batch, the first images.

A latent model is integrated in its latent space (``Config.flow_shape``) and each batch of samples is decoded
to uint8 images (``Flow.images``) before its features are taken: distances and grids are always of images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from loomcfm_core.config import Config, load_config_text
from loomcfm_core.evaluation.feature_weights import inception_weights, load_classifier
from loomcfm_core.evaluation.metrics import ClassifierFeatures, FeatureNetwork, InceptionFeatures
from loomcfm_core.models.loading import default_device, load_flow
from loomcfm_core.sampling import generate
from loomcfm_core.storage import absolute
from loomcfm_core.workers import batches, run_parts, worker_ranges

HEAD = 64  # samples kept for the grid of each method


def feature_network(cfg: Config, images_uri: str, device: torch.device | str = "cpu") -> FeatureNetwork:
    """The network a config scores with (``Config.feature_network``), with its weights: the classifier stored
    beside the image dataset ``images_uri``, or the configured Inception weights."""
    if cfg.feature_network == "classifier":
        return ClassifierFeatures(load_classifier(images_uri), cfg.data.name, device)
    weights = inception_weights(cfg.eval.inception_weights, cfg.eval.inception_sha256, cfg.data.local_cache)
    return InceptionFeatures(weights, device, cfg.eval.batch_size)


def check_feature_weights(cfg: Config) -> None:
    """Fail now, not after training, when the config scores with Inception and its weights are not at hand
    (the classifier is trained with the dataset at cache time and needs nothing here); the verified copy is
    kept in ``data.local_cache`` for the evaluation to use."""
    if cfg.feature_network == "inception":
        inception_weights(cfg.eval.inception_weights, cfg.eval.inception_sha256, cfg.data.local_cache)


@dataclass
class MethodSamples:
    """What evaluation keeps of one method's samples: features, every batch's NFE, the first images (uint8,
    decoded for a latent model)."""

    features: list[np.ndarray] = field(default_factory=list)
    nfes: list[float] = field(default_factory=list)
    head: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0

    def merge(self, other: MethodSamples) -> None:
        self.features += other.features
        self.nfes += other.nfes
        self.head += other.head
        self.seconds = max(self.seconds, other.seconds)  # workers run side by side


def _part(config_yaml: str, checkpoint_uri: str, images_uri: str, methods: list[str], seeds: torch.Tensor,
          device: str | None) -> tuple[dict[str, MethodSamples], dict | None]:
    """One worker's samples for every method, as uint8 images (a latent model's decoded batch by batch),
    reduced to their features (float32: exactly what the network gave) and the first ``HEAD`` images; and the
    checkpoint's latent space (``None`` in pixel space)."""
    cfg = load_config_text(config_yaml)
    device = torch.device(device) if device else default_device()
    flow = load_flow(cfg, checkpoint_uri, device)
    network = feature_network(cfg, images_uri, device)
    out = {}
    for method in methods:
        kept, start = MethodSamples(), time.perf_counter()
        for chunk in batches(seeds, cfg.eval.batch_size):
            samples = generate(flow.model, cfg.flow_shape, method, chunk, len(chunk), device, desc=f"eval {method}")
            images = flow.images(samples.images, device)
            kept.features.append(network.features(images).astype(np.float32))
            kept.nfes.append(samples.nfe)
            if sum(len(h) for h in kept.head) < HEAD:
                kept.head.append(images[:HEAD])
        kept.seconds = time.perf_counter() - start
        out[method] = kept
    return out, flow.latent_space.to_dict() if flow.latent_space else None


def sample_methods(cfg: Config, checkpoint_uri: str, images_uri: str, methods: list[str], seeds: torch.Tensor,
                   device: torch.device | None = None) -> tuple[dict[str, MethodSamples], dict | None]:
    """Every method's features (in seed order), NFEs and first images, gathered from the workers, and the
    checkpoint's latent space.

    Args:
        images_uri: the image dataset the feature network belongs to (a latent cache's images).
        device: where a single worker samples (default: the GPU if there is one); Ray workers pick their own.
    """
    ranges = worker_ranges(len(seeds), cfg.eval.batch_size, cfg.ray.num_workers)
    parts = [(absolute(checkpoint_uri), images_uri, methods, seeds[r.start:r.stop], device and str(device))
             for r in ranges]
    merged = {method: MethodSamples() for method in methods}
    results = run_parts(cfg, _part, parts)
    for result, _ in results:
        for method, kept in result.items():
            merged[method].merge(kept)
    return merged, results[0][1]
