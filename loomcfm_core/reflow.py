"""Reflow: (noise, sample) pairs from a trained model, and the config that trains on them.

Each pair is stored as the noise *seed* (int64, regenerated on the training device exactly like LOOM's
noise) and the generated target (``reflow.target_dtype``: 8-bit pixels by default, float32 on request,
:mod:`loomcfm_core.data.pairs`), in the same sharded HDF5 layout as any cached dataset, so the
reflow stage reuses the whole data path. A latent model's targets are its latents (scaled, as the flow
sees them, not decoded images; always float32), with the latent space in the manifest, so the reflowed
model decodes with the same autoencoder and scale. Generation is content-addressed like ``cache``: the same
checkpoint, method and count is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import torch

from loomcfm_core.config import Config
from loomcfm_core.data.cache import commit_manifest, intact_manifest
from loomcfm_core.generation import pair_target_dtype, pairs_on_workers
from loomcfm_core.models.loading import fitting_weights
from loomcfm_core.sampling import sample_seeds
from loomcfm_core.storage import absolute, join

PAIR_SEED_OFFSET = 1 << 50  # pair noise never coincides with evaluation noise
log = logging.getLogger(__name__)


def pairs_uri_for(cfg: Config, checkpoint_uri: str) -> tuple[str, str]:
    identity = {"checkpoint": checkpoint_uri, "method": cfg.reflow.method, "num_pairs": cfg.reflow.num_pairs,
                "model": cfg.model.model_dump(mode="json"), "shard_size": cfg.data.shard_size,
                "target_dtype": cfg.reflow.target_dtype}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return join(absolute(cfg.storage.root), "datasets", f"{cfg.data.name}-pairs-{key}"), key


def generate_pairs(cfg: Config, checkpoint_uri: str, device: torch.device | None = None,
                   output: str | None = None) -> tuple[str, dict]:
    """Write ``reflow.num_pairs`` pairs sampled with ``reflow.method`` on ``ray.num_workers`` workers (each
    writes its own shards; the manifest, written here last, commits them); returns the dataset URI and manifest.

    Args:
        device: where a single worker samples (default: the GPU if there is one); Ray workers pick their own.
        output: where to write them (the reference's ``--output``); default: the content-addressed URI.
    """
    uri, key = pairs_uri_for(cfg, checkpoint_uri)
    uri = absolute(output) if output else uri
    existing = intact_manifest(uri, key, cfg.data.local_cache)
    if existing is not None:
        log.info("pairs already generated at %s: nothing to do", uri)
        return uri, existing
    fitting_weights(cfg, checkpoint_uri)  # a checkpoint that does not fit fails here, not in every worker
    seeds = sample_seeds(cfg.reflow.num_pairs, offset=PAIR_SEED_OFFSET)
    shards, nfes, space = pairs_on_workers(cfg, absolute(checkpoint_uri), uri, seeds, device)
    manifest = {"name": f"{cfg.data.name}-pairs", "kind": "pairs", "config_hash": key, "shape": list(cfg.flow_shape),
                "source": f"pairs:{checkpoint_uri}", "method": cfg.reflow.method,
                "target_dtype": pair_target_dtype(cfg),
                "arrays": {"target": pair_target_dtype(cfg), "seeds": "int64"}, "latent_space": space}
    manifest = commit_manifest(uri, manifest, {"train": shards})
    log.info("wrote %d pairs (%s, %.1f NFE each) on %d workers to %s", len(seeds), cfg.reflow.method,
             np.mean(nfes), cfg.ray.num_workers, uri)
    return uri, manifest


def reflow_config(cfg: Config, pairs_uri: str, checkpoint_uri: str) -> Config:
    """The base config turned into its reflow stage: pairs coupling on the generated data, the ``reflow``
    section's optimisation settings, initialised from the base model's EMA weights."""
    out = cfg.model_copy(deep=True)
    out.coupling.kind = "pairs"
    out.data.uri, out.data.hflip = pairs_uri, False
    out.train.init_from = checkpoint_uri
    out.train.run_name = None
    out.train.max_steps = cfg.reflow.max_steps
    out.train.batch_size, out.train.lr = cfg.reflow.batch_size, cfg.reflow.lr
    out.train.warmup_steps, out.train.epochs = cfg.reflow.warmup_steps, cfg.reflow.epochs
    return out
