"""Sampling on every worker: ``pairs`` and ``evaluate`` split their noise seeds across ``ray.num_workers``.

Each worker (a Ray task, on a GPU of its own when ``ray.use_gpu``; in this process when there is one worker)
takes a contiguous run of whole sampling batches, loads the model once, samples, and either writes its own
shards of pairs or returns the feature vectors of its samples. The batches are the same whatever the number
of workers — batch i always holds seeds [i·batch, (i+1)·batch) and features are taken per batch — so the same
seeds give the same samples and the same features with one worker or sixteen. A latent model is integrated in
its latent space (``Config.flow_shape``); pairs keep the latents (what reflow trains on), evaluation decodes
each batch's samples to uint8 images (``Flow.images``) before taking features. The driver commits the manifest
(or computes the distance) after every worker has finished, so a failed worker leaves no complete-looking
dataset behind.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loomcfm_core.config import Config, load_config_text
from loomcfm_core.data.cache import ShardWriter
from loomcfm_core.data.pairs import store_targets
from loomcfm_core.metrics import feature_network
from loomcfm_core.models.loading import default_device, load_flow
from loomcfm_core.sampling import generate
from loomcfm_core.storage import absolute

HEAD = 64  # samples kept for the grid of each method


def worker_ranges(num: int, batch_size: int, workers: int) -> list[range]:
    """Contiguous runs of whole batches of ``range(num)``, one per worker that gets any."""
    batches = -(-num // batch_size)
    bounds = [round(w * batches / workers) for w in range(workers + 1)]
    return [range(lo * batch_size, min(hi * batch_size, num)) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def run_parts(cfg: Config, fn: Callable, parts: list[tuple]) -> list:
    """``fn(config_yaml, *part)`` for every part, in order: here for one worker, else as Ray tasks (a GPU each
    when ``ray.use_gpu``) on the cluster ``run_on_ray`` uses."""
    if cfg.ray.num_workers == 1:
        return [fn(cfg.to_yaml(), *part) for part in parts]
    import ray

    from loomcfm_core.training.launch import connect, with_absolute_paths

    connect(cfg)
    config_yaml = with_absolute_paths(cfg).to_yaml()  # the tasks run in other working directories
    task = ray.remote(num_cpus=cfg.ray.cpus_per_worker, num_gpus=1 if cfg.ray.use_gpu else 0)(fn)
    return ray.get([task.remote(config_yaml, *part) for part in parts])


def _batches(seeds: torch.Tensor, batch_size: int):
    for start in range(0, len(seeds), batch_size):
        yield seeds[start:start + batch_size]


# ---- pairs -----------------------------------------------------------------------------------------------

def pair_target_dtype(cfg: Config) -> str:
    """How pair targets are stored: ``reflow.target_dtype`` for pixels; a latent model's targets are latents,
    not pixels, and stay float32."""
    return "float32" if cfg.model.autoencoder is not None else cfg.reflow.target_dtype


def _pairs_part(config_yaml: str, checkpoint_uri: str, uri: str, seeds: torch.Tensor, part: int,
                device: str | None) -> tuple[list[dict], list[float], dict | None]:
    """One worker's pairs: sampled in the global batches, written as ``train/part-<part>-shard-*.h5``; a latent
    model's targets are its (scaled) latents, never decoded.

    Returns:
        The shards, every batch's NFE and the checkpoint's latent space (``None`` in pixel space), which the
        pairs' manifest records so that the reflowed model's checkpoints record it too.
    """
    cfg = load_config_text(config_yaml)
    device = torch.device(device) if device else default_device()
    flow = load_flow(cfg, checkpoint_uri, device, decoder=False)
    nfes = []
    with tempfile.TemporaryDirectory(prefix="loomcfm-pairs-") as tmp:
        writer = ShardWriter(uri, "train", cfg.data.shard_size, Path(tmp), prefix=f"part-{part:03d}-")
        for chunk in _batches(seeds, cfg.sample.batch_size):
            samples = generate(flow.model, cfg.flow_shape, cfg.reflow.method, chunk, len(chunk), device,
                               desc=f"pairs part {part}")
            nfes.append(samples.nfe)
            writer.write({"target": store_targets(samples.images, pair_target_dtype(cfg)), "seeds": chunk.numpy()})
        return writer.close(), nfes, flow.latent_space.to_dict() if flow.latent_space else None


def pairs_on_workers(cfg: Config, checkpoint_uri: str, uri: str, seeds: torch.Tensor,
                     device: torch.device | None = None) -> tuple[list[dict], list[float], dict | None]:
    """Every worker's shards (in seed order), every batch's NFE and the latent space; the caller commits the
    manifest."""
    ranges = worker_ranges(len(seeds), cfg.sample.batch_size, cfg.ray.num_workers)
    parts = [(checkpoint_uri, uri, seeds[r.start:r.stop], part, device and str(device))
             for part, r in enumerate(ranges)]
    results = run_parts(cfg, _pairs_part, parts)
    return [s for shards, _, _ in results for s in shards], [n for _, nfes, _ in results for n in nfes], results[0][2]


# ---- evaluation ------------------------------------------------------------------------------------------

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


def _eval_part(config_yaml: str, checkpoint_uri: str, images_uri: str, methods: list[str], seeds: torch.Tensor,
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
        for chunk in _batches(seeds, cfg.eval.batch_size):
            samples = generate(flow.model, cfg.flow_shape, method, chunk, len(chunk), device, desc=f"eval {method}")
            images = flow.images(samples.images, device)
            kept.features.append(network.features(images).astype(np.float32))
            kept.nfes.append(samples.nfe)
            if sum(len(h) for h in kept.head) < HEAD:
                kept.head.append(images[:HEAD])
        kept.seconds = time.perf_counter() - start
        out[method] = kept
    return out, flow.latent_space.to_dict() if flow.latent_space else None


def eval_on_workers(cfg: Config, checkpoint_uri: str, images_uri: str, methods: list[str], seeds: torch.Tensor,
                    device: torch.device | None = None) -> tuple[dict[str, MethodSamples], dict | None]:
    """Every method's features (in seed order), NFEs and first images, gathered from the workers, and the
    checkpoint's latent space.

    Args:
        images_uri: the image dataset the feature network belongs to (a latent cache's images).
    """
    ranges = worker_ranges(len(seeds), cfg.eval.batch_size, cfg.ray.num_workers)
    parts = [(absolute(checkpoint_uri), images_uri, methods, seeds[r.start:r.stop], device and str(device))
             for r in ranges]
    merged = {method: MethodSamples() for method in methods}
    results = run_parts(cfg, _eval_part, parts)
    for result, _ in results:
        for method, kept in result.items():
            merged[method].merge(kept)
    return merged, results[0][1]
