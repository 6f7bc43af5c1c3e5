"""The latent cache: a cached image dataset encoded once by ``model.autoencoder``, and training targets drawn
from it.

Layout: the sharded HDF5 of :mod:`loomcfm_core.data.cache` under ``<storage.root>/datasets/<name>-latents-
<hash>/`` (:func:`loomcfm_core.layout.latents_uri`), train split only (what training reads). A KL autoencoder's
rows are ``posterior float16 [n, 2, C, h, w]`` (the posterior's mean and standard deviation); a VQ
autoencoder's are ``latents float16 [n, C, h, w]``, the quantised latents (codebook rows: what its decoder
reads). With ``data.hflip`` the flip happens in pixel space before encoding (encoding does not commute with
flipping), so row ``i + N`` is the encoding of image ``i`` mirrored and the cache holds 2N points. The manifest
carries the images' URI and the :class:`~loomcfm_core.models.autoencoder.LatentSpace`: the autoencoder's
identity and the scale.

The scale (the flow sees ``z / scale``) is fixed once, here: ``model.autoencoder.scale`` when set, else the
weights' own (a reference checkpoint's ``ae.scale``), else the reference implementation's rule — the
population standard deviation over all elements of posterior samples of the first batch, which here is the
first ``train.batch_size`` train points in stored order (unflipped), sampled with a generator seeded by
``train.seed``. Training then samples the posterior afresh every step (:class:`PosteriorTargets`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from itertools import chain

import numpy as np
import torch

from loomcfm_core.config import Config
from loomcfm_core.data.cache import FORMAT, CachedDataset, read_manifest, write_dataset
from loomcfm_core.data.dataset import ShardedDataset
from loomcfm_core.models.autoencoder import LatentSpace, load_autoencoder, locate
from loomcfm_core.models.loading import default_device
from loomcfm_core.layout import latents_uri
from loomcfm_core.storage import storage_for

ARRAYS = {"kl": "posterior", "vq": "latents"}  # the stored array of each autoencoder kind
POSTERIOR_SEED_OFFSET = 500  # the posterior draws' generator: train.seed * 1000 + offset + rank
log = logging.getLogger(__name__)


def image_dataset_of(uri: str) -> str:
    """The image dataset behind a dataset URI: a latent cache's images, else the dataset itself."""
    manifest = read_manifest(uri)
    return manifest["images_uri"] if manifest is not None and manifest.get("kind") == "latents" else uri


def latents_key(cfg: Config, images_key: str) -> str:
    """Hash of what determines the latent shards and the scale, computed without reading the weights."""
    ae, where = cfg.model.autoencoder, locate(cfg)
    config_text = storage_for(where.config_uri).read_text(where.config_uri) if where.config_uri else ""
    identity = {"format": FORMAT, "images": images_key, "kind": ae.kind, "sha256": where.expected_sha256,
                "config": hashlib.sha256(config_text.encode()).hexdigest(), "hflip": cfg.data.hflip,
                "shard_size": cfg.data.shard_size, "scale": ae.scale,
                "scale_rule": None if ae.scale else [cfg.train.batch_size, cfg.train.seed]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def first_batch_scale(stored: np.ndarray, kind: str, seed: int) -> float:
    """The reference's scale: the population std of the posterior samples of one batch of stored rows.

    Sums are exact (``math.fsum``), so the value depends on the rows and the seed alone, not on how a
    vectorised reduction happened to split them.
    """
    rows = torch.from_numpy(stored).double()
    if kind == "kl":
        mean, std = rows[:, 0], rows[:, 1]
        rows = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed)).double()
    values = rows.flatten().tolist()
    centre = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - centre) ** 2 for v in values) / len(values))


def cache_latents(cfg: Config, images: CachedDataset) -> CachedDataset:
    """Encode the cached images' train split once (on the GPU when there is one); a no-op when cached."""
    ae = cfg.model.autoencoder
    key = latents_key(cfg, images.manifest["config_hash"])
    uri = latents_uri(cfg, key)
    existing = read_manifest(uri)
    if existing is not None and existing.get("config_hash") == key:
        log.info("latents already cached at %s: nothing to do", uri)
        return CachedDataset(uri, existing, created=False)
    device = default_device()
    autoencoder = load_autoencoder(cfg).to(device)
    dataset = ShardedDataset(images.uri, "train", local_cache=cfg.data.local_cache)
    n, array, first = dataset.num_images, ARRAYS[ae.kind], []

    def encoded(flip: bool) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, n, ae.batch_size):
            stop = min(n, start + ae.batch_size)
            batch = torch.stack([dataset[i][0] for i in range(start, stop)])
            rows = autoencoder.encode((batch.flip(-1) if flip else batch).to(device)).half().cpu().numpy()
            if not flip and start < cfg.train.batch_size:
                first.append(rows)
            yield {array: rows, "labels": dataset.labels[start:stop]}

    def finish(manifest: dict) -> dict:
        if ae.scale is not None:
            scale, source = ae.scale, "model.autoencoder.scale"
        elif autoencoder.own_scale is not None:
            scale, source = autoencoder.own_scale, "the weights' own (ae.scale)"
        else:
            batch = min(n, cfg.train.batch_size)
            scale = first_batch_scale(np.concatenate(first)[:batch], ae.kind, cfg.train.seed)
            source = f"std of posterior samples of the first {batch} train points (seed {cfg.train.seed})"
        return dict(manifest, latent_space=LatentSpace(autoencoder.identity, scale, source).to_dict())

    shape = [autoencoder.identity["latent_channels"], *cfg.flow_shape[1:]]
    stored = "posterior mean and std" if ae.kind == "kl" else "quantised latents (codebook rows)"
    manifest = {"name": f"{cfg.data.name}-latents", "kind": "latents", "config_hash": key, "source":
                f"latents:{images.uri}", "images_uri": images.uri, "shape": shape, "hflip": cfg.data.hflip,
                "array": array, "stored": stored,
                "arrays": {array: "float16 [n, 2 (mean, std), C, h, w]" if ae.kind == "kl" else "float16 [n, C, h, w]",
                           "labels": "int64"}}
    splits = {"train": chain(encoded(False), encoded(True) if cfg.data.hflip else [])}
    manifest = write_dataset(uri, splits, cfg.data.shard_size, manifest, desc="encoding", finish=finish,
                             totals={"train": n * (2 if cfg.data.hflip else 1)})
    log.info("encoded %d images (%s) with %s into %s; scale %.5g", n, "and their mirror images" if cfg.data.hflip
             else "no flips", ae.weights, uri, manifest["latent_space"]["scale"])
    return CachedDataset(uri, manifest, created=True)


class Targets:
    """Turns a loaded training batch into the flow's targets: pixels (and reflow pairs) as they are.

    ``space`` is the latent space the targets live in (``None`` for pixels); checkpoints record it.
    """

    def __init__(self, space: dict | None = None) -> None:
        self.space = space

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def rng_state(self) -> dict:
        """Generator states a resume must restore (saved with the rank's other RNG states)."""
        return {}

    def set_rng_state(self, rng: dict) -> None:
        """Restore what :meth:`rng_state` saved."""


class PosteriorTargets(Targets):
    """Latent targets from the cache: ``z / scale`` with ``z = mean + std * eps`` drawn afresh every step (KL;
    VQ latents are used as stored), eps from this rank's generator, which is part of the checkpoint.

    The draw is on the host, from the loaded batch: the coupling planner (:mod:`loomcfm_core.training.
    pipelined`) draws each batch where it decides that batch's assignment, one unit ahead of the training
    step, and the coupling gathers and solves on host tensors; the same draws then go to the device.
    """

    def __init__(self, manifest: dict, seed: int) -> None:
        super().__init__(manifest["latent_space"])
        self.kind = "kl" if manifest["array"] == ARRAYS["kl"] else "vq"
        self.scale = float(manifest["latent_space"]["scale"])
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.kind == "kl":
            mean, std = batch[:, 0], batch[:, 1]
            batch = mean + std * torch.randn(mean.shape, generator=self.generator)
        return batch / self.scale

    def rng_state(self) -> dict:
        return {"posterior": self.generator.get_state()}

    def set_rng_state(self, rng: dict) -> None:
        self.generator.set_state(rng["posterior"])


def training_targets(dataset: ShardedDataset, seed: int, rank: int = 0) -> Targets:
    """The targets of a training dataset: posterior draws for a latent cache, the stored items otherwise."""
    if dataset.manifest.get("kind") == "latents":
        return PosteriorTargets(dataset.manifest, seed * 1000 + POSTERIOR_SEED_OFFSET + rank)
    return Targets(dataset.manifest.get("latent_space"))
