"""Sampling on every worker: ``pairs`` and ``evaluate`` split their noise seeds across ``ray.num_workers``.

Each worker (a Ray task, on a GPU of its own when ``ray.use_gpu``; in this process when there is one worker)
takes a contiguous run of whole sampling batches, loads the model once, samples, and either writes its own
shards of pairs or returns the feature vectors of its samples. The batches are the same whatever the number
of workers — batch i always holds seeds [i·batch, (i+1)·batch) and features are taken per batch — so the same
seeds give the same samples and the same features with one worker or sixteen. The driver commits the manifest
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
from loomcfm_core.models.loading import default_device, load_model
from loomcfm_core.sampling import generate, to_uint8
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

def _pairs_part(config_yaml: str, checkpoint_uri: str, uri: str, seeds: torch.Tensor, part: int,
                device: str | None) -> tuple[list[dict], list[float]]:
    """One worker's pairs: sampled in the global batches, written as ``train/part-<part>-shard-*.h5``."""
    cfg = load_config_text(config_yaml)
    device = torch.device(device) if device else default_device()
    model = load_model(cfg, checkpoint_uri, device)
    nfes = []
    with tempfile.TemporaryDirectory(prefix="loomcfm-pairs-") as tmp:
        writer = ShardWriter(uri, "train", cfg.data.shard_size, Path(tmp), prefix=f"part-{part:03d}-")
        for chunk in _batches(seeds, cfg.sample.batch_size):
            samples = generate(model, cfg.data.shape, cfg.reflow.method, chunk, len(chunk), device,
                               desc=f"pairs part {part}")
            nfes.append(samples.nfe)
            writer.write({"target": store_targets(samples.images, cfg.reflow.target_dtype), "seeds": chunk.numpy()})
        return writer.close(), nfes


def pairs_on_workers(cfg: Config, checkpoint_uri: str, uri: str, seeds: torch.Tensor,
                     device: torch.device | None = None) -> tuple[list[dict], list[float]]:
    """Every worker's shards (in seed order) and every batch's NFE; the caller commits the manifest."""
    ranges = worker_ranges(len(seeds), cfg.sample.batch_size, cfg.ray.num_workers)
    parts = [(checkpoint_uri, uri, seeds[r.start:r.stop], part, device and str(device))
             for part, r in enumerate(ranges)]
    results = run_parts(cfg, _pairs_part, parts)
    return [s for shards, _ in results for s in shards], [n for _, nfes in results for n in nfes]


# ---- evaluation ------------------------------------------------------------------------------------------

@dataclass
class MethodSamples:
    """What evaluation keeps of one method's samples: features, every batch's NFE, the first images."""

    features: list[np.ndarray] = field(default_factory=list)
    nfes: list[float] = field(default_factory=list)
    head: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0

    def merge(self, other: MethodSamples) -> None:
        self.features += other.features
        self.nfes += other.nfes
        self.head += other.head
        self.seconds = max(self.seconds, other.seconds)  # workers run side by side


def _eval_part(config_yaml: str, checkpoint_uri: str, dataset_uri: str, methods: list[str], seeds: torch.Tensor,
               device: str | None) -> dict[str, MethodSamples]:
    """One worker's samples for every method, reduced to their features (float32: exactly what the network
    gave) and the first ``HEAD`` images."""
    cfg = load_config_text(config_yaml)
    device = torch.device(device) if device else default_device()
    model = load_model(cfg, checkpoint_uri, device)
    network = feature_network(cfg, dataset_uri, device)
    out = {}
    for method in methods:
        kept, start = MethodSamples(), time.perf_counter()
        for chunk in _batches(seeds, cfg.eval.batch_size):
            samples = generate(model, cfg.data.shape, method, chunk, len(chunk), device, desc=f"eval {method}")
            kept.features.append(network.features(to_uint8(samples.images)).astype(np.float32))
            kept.nfes.append(samples.nfe)
            if sum(len(h) for h in kept.head) < HEAD:
                kept.head.append(samples.images[:HEAD])
        kept.seconds = time.perf_counter() - start
        out[method] = kept
    return out


def eval_on_workers(cfg: Config, checkpoint_uri: str, dataset_uri: str, methods: list[str], seeds: torch.Tensor,
                    device: torch.device | None = None) -> dict[str, MethodSamples]:
    """Every method's features (in seed order), NFEs and first images, gathered from the workers."""
    ranges = worker_ranges(len(seeds), cfg.eval.batch_size, cfg.ray.num_workers)
    parts = [(absolute(checkpoint_uri), dataset_uri, methods, seeds[r.start:r.stop], device and str(device))
             for r in ranges]
    merged = {method: MethodSamples() for method in methods}
    for result in run_parts(cfg, _eval_part, parts):
        for method, kept in result.items():
            merged[method].merge(kept)
    return merged
