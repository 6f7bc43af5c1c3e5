"""Reflow: (noise, sample) pairs from a trained model, and the config that trains on them.

Each pair is stored as the noise *seed* (int64, regenerated on the training device exactly like LOOM's
noise) and the generated target (``reflow.target_dtype``: 8-bit pixels by default, float32 on request,
:mod:`loomcfm_core.data.pairs`), in the same sharded HDF5 layout as any cached dataset, so the
reflow stage reuses the whole data path. A latent model's targets are its latents (scaled, as the flow
sees them, not decoded images; always float32), with the latent space in the manifest, so the reflowed
model decodes with the same autoencoder and scale. Generation is content-addressed like ``cache``
(:func:`loomcfm_core.layout.pairs_uri`): the same checkpoint, method and count is a no-op. The samples are
drawn on ``ray.num_workers`` workers (:mod:`loomcfm_core.workers`), each writing shards of its own.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from loomcfm_core import layout
from loomcfm_core.config import Config, load_config_text
from loomcfm_core.data.cache import ShardWriter, commit_manifest, intact_manifest
from loomcfm_core.data.pairs import store_targets
from loomcfm_core.models.loading import default_device, fitting_weights, load_flow
from loomcfm_core.sampling import generate, sample_seeds
from loomcfm_core.storage import absolute
from loomcfm_core.workers import batches, run_parts, worker_ranges

PAIR_SEED_OFFSET = 1 << 50  # pair noise never coincides with evaluation noise
log = logging.getLogger(__name__)


def _part(config_yaml: str, checkpoint_uri: str, uri: str, seeds: torch.Tensor, part: int,
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
        for chunk in batches(seeds, cfg.sample.batch_size):
            samples = generate(flow.model, cfg.flow_shape, cfg.reflow.method, chunk, len(chunk), device,
                               desc=f"pairs part {part}")
            nfes.append(samples.nfe)
            writer.write({"target": store_targets(samples.images, cfg.pair_target_dtype), "seeds": chunk.numpy()})
        return writer.close(), nfes, flow.latent_space.to_dict() if flow.latent_space else None


def generate_pairs(cfg: Config, checkpoint_uri: str, device: torch.device | None = None,
                   output: str | None = None) -> tuple[str, dict]:
    """Write ``reflow.num_pairs`` pairs sampled with ``reflow.method`` on ``ray.num_workers`` workers (each
    writes its own shards; the manifest, written here last, commits them); returns the dataset URI and manifest.

    Args:
        device: where a single worker samples (default: the GPU if there is one); Ray workers pick their own.
        output: where to write them (the reference's ``--output``); default: the content-addressed URI.
    """
    key = layout.pairs_key(cfg, checkpoint_uri)
    uri = absolute(output) if output else layout.pairs_uri(cfg, checkpoint_uri)
    existing = intact_manifest(uri, key, cfg.data.local_cache)
    if existing is not None:
        log.info("pairs already generated at %s: nothing to do", uri)
        return uri, existing
    fitting_weights(cfg, checkpoint_uri)  # a checkpoint that does not fit fails here, not in every worker
    seeds = sample_seeds(cfg.reflow.num_pairs, offset=PAIR_SEED_OFFSET)
    ranges = worker_ranges(len(seeds), cfg.sample.batch_size, cfg.ray.num_workers)
    parts = [(absolute(checkpoint_uri), uri, seeds[r.start:r.stop], part, device and str(device))
             for part, r in enumerate(ranges)]
    results = run_parts(cfg, _part, parts)  # every worker's shards in seed order, its NFEs, the latent space
    shards, nfes, space = [s for r in results for s in r[0]], [n for r in results for n in r[1]], results[0][2]
    manifest = {"name": f"{cfg.data.name}-pairs", "kind": "pairs", "config_hash": key, "shape": list(cfg.flow_shape),
                "source": f"pairs:{checkpoint_uri}", "method": cfg.reflow.method,
                "target_dtype": cfg.pair_target_dtype,
                "arrays": {"target": cfg.pair_target_dtype, "seeds": "int64"}, "latent_space": space}
    manifest = commit_manifest(uri, manifest, {"train": shards})
    log.info("wrote %d pairs (%s, %.1f NFE each) on %d workers to %s", len(seeds), cfg.reflow.method,
             np.mean(nfes), cfg.ray.num_workers, uri)
    return uri, manifest


def reflow_config(cfg: Config, pairs_uri: str, checkpoint_uri: str) -> Config:
    """The base config turned into its reflow stage: pairs coupling on the generated data, the ``reflow``
    section's optimisation settings, initialised from the base model's EMA weights."""
    out = cfg.model_copy(deep=True)
    out.coupling.kind = "pairs"  # Config.is_reflow
    out.data.uri, out.data.hflip = pairs_uri, False
    out.train.init_from = checkpoint_uri
    out.train.run_name = None
    out.train.max_steps = cfg.reflow.max_steps
    out.train.batch_size, out.train.lr = cfg.reflow.batch_size, cfg.reflow.lr
    out.train.warmup_steps, out.train.epochs = cfg.reflow.warmup_steps, cfg.reflow.epochs
    return out
