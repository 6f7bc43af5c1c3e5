"""The latent cache: encoded once, flips encoded in pixel space, float16 shards, the scale in the manifest;
and the posterior draws training takes from it."""

import h5py
import numpy as np
import pytest
import torch

from loomcfm_core.checksums import sha256_file
from loomcfm_core.data import latents as latents_module
from loomcfm_core.data.cache import cache_dataset
from loomcfm_core.data.dataset import ShardedDataset
from loomcfm_core.data.latents import (PosteriorTargets, cache_latents, first_batch_scale, image_dataset_of,
                                       training_targets)
from loomcfm_core.errors import UsageError
from tests.data.shapes import shapes_folder
from tests.models.autoencoders import latent_config, save_folder, tiny_kl, tiny_vq


def _cfg(tmp_path, weights, *extra, kind="kl"):
    return latent_config(tmp_path, weights, f"data.source=imagefolder:{shapes_folder(tmp_path / 'shapes', 6, 2)}",
                         "data.hflip=true", f"storage.root={tmp_path / 'store'}", "data.shard_size=5",
                         "train.batch_size=8", "model.autoencoder.batch_size=5", "data.name=shapes", *extra,
                         kind=kind)


def _rows(uri, manifest, array):
    parts = []
    for shard in manifest["splits"]["train"]["shards"]:
        with h5py.File(f"{uri}/{shard['path']}", "r") as fh:
            assert fh[array].dtype == np.float16 and fh[array].chunks[0] == 1
            parts.append(fh[array][:])
    return np.concatenate(parts)


def test_cache_encodes_images_and_their_mirror_images_once(tmp_path, monkeypatch):
    original = tiny_kl()
    folder = save_folder(original, tmp_path / "kl")
    cfg = _cfg(tmp_path, folder)
    images = cache_dataset(cfg)
    cached = cache_latents(cfg, images)
    manifest = cached.manifest
    assert cached.created and manifest["kind"] == "latents" and manifest["hflip"] and manifest["shape"] == [4, 8, 8]
    assert manifest["images_uri"] == images.uri and image_dataset_of(cached.uri) == images.uri
    assert manifest["splits"]["train"]["count"] == 24 and len(manifest["splits"]["train"]["shards"]) == 5
    space = manifest["latent_space"]
    assert space["autoencoder"]["sha256"] == sha256_file(folder / "diffusion_pytorch_model.safetensors")
    assert space["autoencoder"]["weights"] == str(folder) and space["autoencoder"]["format"] == "diffusers"

    rows = _rows(cached.uri, manifest, "posterior")
    assert rows.shape == (24, 2, 4, 8, 8)
    pixels = torch.stack([ShardedDataset(images.uri)[i][0] for i in range(12)])
    with torch.no_grad():
        plain, mirrored = (original.encode(x).latent_dist for x in (pixels, pixels.flip(-1)))
    for stored, posterior in ((rows[:12], plain), (rows[12:], mirrored)):
        expected = torch.stack([posterior.mean, posterior.std], 1)
        torch.testing.assert_close(torch.from_numpy(stored).float(), expected, rtol=2e-3, atol=2e-3)
    # Encoding does not commute with flipping: the mirror images' rows are their own encodings.
    assert not np.allclose(rows[12:, 0], rows[:12, 0, ..., ::-1], atol=0.05)

    # The reference's rule on the first train.batch_size stored points, as the manifest says.
    assert space["scale"] == first_batch_scale(rows[:8], "kl", cfg.train.seed)
    assert space["scale_source"] == "std of posterior samples of the first 8 train points (seed 0)"
    eps = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    samples = torch.from_numpy(rows[:8, 0]).double() + torch.from_numpy(rows[:8, 1]).double() * eps.double()
    assert space["scale"] == pytest.approx(samples.std(unbiased=False).item(), rel=1e-6)

    monkeypatch.setattr(latents_module, "load_autoencoder", lambda cfg: pytest.fail("encoded again"))
    again = cache_latents(cfg, cache_dataset(cfg))
    assert (again.uri, again.created, again.manifest) == (cached.uri, False, manifest)


def test_a_configured_scale_is_used_and_changes_the_cache(tmp_path):
    folder = save_folder(tiny_kl(), tmp_path / "kl")
    cfg = _cfg(tmp_path, folder)
    computed = cache_latents(cfg, cache_dataset(cfg))
    configured = _cfg(tmp_path, folder, "model.autoencoder.scale=0.5")
    pinned = cache_latents(configured, cache_dataset(configured))
    assert pinned.uri != computed.uri and pinned.manifest["latent_space"]["scale"] == 0.5
    assert pinned.manifest["latent_space"]["scale_source"] == "model.autoencoder.scale"


def test_latent_dataset_serves_stored_rows_and_refuses_other_flips(tmp_path):
    cfg = _cfg(tmp_path, save_folder(tiny_kl(), tmp_path / "kl"))
    cached = cache_latents(cfg, cache_dataset(cfg))
    dataset = ShardedDataset(cached.uri, hflip=True)
    rows = _rows(cached.uri, cached.manifest, "posterior")
    assert (len(dataset), dataset.num_images) == (24, 12)
    item, label, index = dataset[17]
    assert item.dtype == torch.float32 and torch.equal(item, torch.from_numpy(rows[17]).float())
    assert (label, index) == (dataset[5][1], 17)
    with pytest.raises(UsageError, match=r"encoded with data\.hflip=true"):
        ShardedDataset(cached.uri, hflip=False)


def test_posterior_draws_are_mean_plus_std_noise_over_scale_and_resume(tmp_path):
    cfg = _cfg(tmp_path, save_folder(tiny_kl(), tmp_path / "kl"))
    cached = cache_latents(cfg, cache_dataset(cfg))
    targets = training_targets(ShardedDataset(cached.uri, hflip=True), seed=3, rank=1)
    assert isinstance(targets, PosteriorTargets) and targets.space == cached.manifest["latent_space"]
    batch = torch.stack([ShardedDataset(cached.uri, hflip=True)[i][0] for i in (0, 13, 7)])
    saved = targets.rng_state()
    first = targets(batch)
    eps = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3 * 1000 + 500 + 1))
    torch.testing.assert_close(first, (batch[:, 0] + batch[:, 1] * eps) / targets.scale, rtol=0, atol=0)
    second = targets(batch)
    assert not torch.equal(first, second), "a fresh draw every step"
    targets.set_rng_state(saved)
    assert torch.equal(targets(batch), first), "the generator's state resumes the draws"


def test_vq_cache_stores_codebook_rows(tmp_path):
    original = tiny_vq()
    cfg = _cfg(tmp_path, save_folder(original, tmp_path / "vq"), kind="vq")
    cached = cache_latents(cfg, cache_dataset(cfg))
    rows = torch.from_numpy(_rows(cached.uri, cached.manifest, "latents")).float()
    assert rows.shape == (24, 4, 8, 8) and cached.manifest["stored"].startswith("quantised")
    codebook = original.quantize.embedding.weight.detach().half().float()
    assert (torch.cdist(rows.permute(0, 2, 3, 1).reshape(-1, 4), codebook).min(1).values == 0).all()
    targets = training_targets(ShardedDataset(cached.uri, hflip=True), seed=0)
    assert torch.equal(targets(rows[:2]), rows[:2] / cached.manifest["latent_space"]["scale"])
    assert cached.manifest["latent_space"]["scale"] == pytest.approx(rows[:8].double().std(unbiased=False).item(),
                                                                     rel=1e-12)
