"""Sampling on every worker: ``pairs`` and ``evaluate`` split their noise seeds across ``ray.num_workers``.

Each worker (a Ray task, on a GPU of its own when ``ray.use_gpu``; in this process when there is one worker)
takes a contiguous run of whole sampling batches, loads the model once and samples: the reflow pairs' workers
write their own shards (:mod:`loomcfm_core.reflow`), the evaluation's return the feature vectors of their
samples (:mod:`loomcfm_core.evaluation.samples`). The batches are the same whatever the number of workers —
batch i always holds seeds [i·batch, (i+1)·batch) and features are taken per batch — so the same seeds give
the same samples and the same features with one worker or sixteen. The driver commits the manifest (or
computes the distance) after every worker has finished, so a failed worker leaves no complete-looking dataset
behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from loomcfm_core.config import Config
from loomcfm_core.layout import with_absolute_paths


def worker_ranges(num: int, batch_size: int, workers: int) -> list[range]:
    """Contiguous runs of whole batches of ``range(num)``, one per worker that gets any."""
    batches = -(-num // batch_size)
    bounds = [round(w * batches / workers) for w in range(workers + 1)]
    return [range(lo * batch_size, min(hi * batch_size, num)) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def run_parts(cfg: Config, fn: Callable, parts: list[tuple]) -> list:
    """``fn(config_yaml, *part)`` for every part, in order: here for one worker, else as Ray tasks (a GPU each
    when ``ray.use_gpu``) on the cluster training uses (:func:`loomcfm_core.training.local_ray.connect`)."""
    if cfg.ray.num_workers == 1:
        return [fn(cfg.to_yaml(), *part) for part in parts]
    import ray

    from loomcfm_core.training.local_ray import connect

    connect(cfg.ray)
    config_yaml = with_absolute_paths(cfg).to_yaml()  # the tasks run in other working directories
    task = ray.remote(num_cpus=cfg.ray.cpus_per_worker, num_gpus=1 if cfg.ray.use_gpu else 0)(fn)
    return ray.get([task.remote(config_yaml, *part) for part in parts])


def batches(seeds: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """The seeds in sampling batches of ``batch_size``, in order."""
    for start in range(0, len(seeds), batch_size):
        yield seeds[start:start + batch_size]
