"""Fréchet distance, the Inception feature path with a test-made weights file, and the digits classifier."""

from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

from loomcfm_core.checksums import sha256_file
from loomcfm_core.config import load_config
from loomcfm_core.errors import MetricsError
from loomcfm_core.evaluation.feature_weights import load_classifier
from loomcfm_core.evaluation.metrics import (ClassifierFeatures, FeatureStats, InceptionFeatures, dataset_images,
                                             frechet_distance, reference_stats)
from loomcfm_core.evaluation.samples import feature_network
from loomcfm_core.storage import storage_for
from tests.conftest import inception_cfg


def _random_stats(rng, dim):
    a = rng.normal(size=(dim, dim))
    b = rng.normal(size=(dim, dim))
    return rng.normal(size=dim), a @ a.T / dim + 0.1 * np.eye(dim), rng.normal(size=dim) * 0.5, b @ b.T / dim


@pytest.mark.parametrize("dim", [2, 8, 64, 256])
def test_frechet_distance_matches_pytorch_fid(dim):
    rng = np.random.default_rng(dim)
    mu1, s1, mu2, s2 = _random_stats(rng, dim)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6 * np.trace(s1))


def test_stats_round_trip():
    stats = FeatureStats.of(np.random.default_rng(0).normal(size=(50, 4)))
    back = FeatureStats.from_bytes(stats.to_bytes())
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert back.count == stats.count == 50


def test_inception_features_load_resize_and_batch(tmp_path, random_inception):
    cfg = inception_cfg(tmp_path, random_inception, f"eval.inception_sha256={sha256_file(random_inception)}")
    network = feature_network(cfg, "unused")
    assert isinstance(network, InceptionFeatures) and network.metric == "fid"
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    features = network.features(images)  # two batches of 4 and 2, each resized to 299x299
    assert features.shape == (6, 2048) and np.isfinite(features).all()
    one_by_one = np.concatenate([network.features(images[i:i + 1]) for i in range(6)])
    np.testing.assert_allclose(features, one_by_one, rtol=1e-4, atol=1e-5)
    gray = network.features(images[:2, :1])  # 1-channel images are repeated to RGB
    np.testing.assert_allclose(gray, network.features(images[:2, :1].expand(-1, 3, -1, -1)), rtol=1e-5)


def test_not_inception_weights(tmp_path):
    bogus = tmp_path / "bogus.pth"
    torch.save({"x": torch.zeros(1)}, bogus)
    with pytest.raises(MetricsError, match="not TF-Inception weights"):
        feature_network(inception_cfg(tmp_path, bogus, f"eval.inception_sha256={sha256_file(bogus)}"), "unused")


def test_fd_digits_separates_real_from_noise(tmp_path, digits_cache, store):
    """On the session's cache, whose stage trained the classifier (``train_dataset_classifier``) and stored
    the train split's statistics beside the dataset."""
    assert digits_cache.classifier_val_accuracy > 0.9
    cfg = load_config("digits", [f"storage.root={store}"])
    uri = str(store / "datasets" / Path(digits_cache.dataset_uri).name)
    network = feature_network(cfg, uri)
    assert isinstance(network, ClassifierFeatures) and network.metric == "fd_digits"
    train_stats = reference_stats(uri, network, cfg.data.local_cache)
    assert storage_for(uri).exists(f"{uri}/ref-stats-classifier.npz")
    assert reference_stats(uri, network, cfg.data.local_cache).count == train_stats.count == 1500  # stored, read back

    def fd(images):
        stats = FeatureStats.of(network.features(images))
        return frechet_distance(stats.mu, stats.sigma, train_stats.mu, train_stats.sigma)

    held_out = fd(dataset_images(uri, "val", cfg.data.local_cache))
    noise = fd(torch.randint(0, 256, (297, 1, 8, 8), dtype=torch.uint8))
    assert held_out * 10 < noise, (held_out, noise)
    assert load_classifier(uri).head.out_features == 10


def test_auto_feature_network_is_the_classifier_for_builtin_digits_only():
    assert load_config("digits").feature_network == "classifier"
    assert load_config("cifar10").feature_network == "inception"
    assert load_config("digits", ["eval.feature_network=inception"]).feature_network == "inception"
    assert load_config("cifar10", ["eval.feature_network=classifier"]).feature_network == "classifier"
