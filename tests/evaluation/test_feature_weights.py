"""The feature networks' weights: Inception weights from storage checked by sha256, never downloaded."""

import pytest

from loomcfm_core.checksums import sha256_file
from loomcfm_core.config import load_config
from loomcfm_core.errors import MetricsError
from loomcfm_core.evaluation.feature_weights import inception_weights as weights_of
from loomcfm_core.storage import storage_for
from tests.conftest import inception_cfg


def inception_weights(cfg):
    """The weights a config names, where its node-local copies go."""
    return weights_of(cfg.eval.inception_weights, cfg.eval.inception_sha256, cfg.data.local_cache)


def test_inception_weights_from_s3_with_sidecar_hash(tmp_path, random_inception, s3_bucket):
    uri = f"s3://{s3_bucket}/weights/inception.pth"
    store = storage_for(uri)
    store.put(random_inception, uri)
    store.write_text(uri + ".sha256", f"{sha256_file(random_inception)}  test\n")
    local = inception_weights(inception_cfg(tmp_path, uri))
    assert sha256_file(local) == sha256_file(random_inception)


def test_missing_weights_fail_clearly(tmp_path):
    with pytest.raises(MetricsError, match="eval.inception_weights is not set"):
        inception_weights(load_config("digits"))
    with pytest.raises(MetricsError, match=r"nope\.pth: file not found.*weights fetch"):
        inception_weights(inception_cfg(tmp_path, tmp_path / "nope.pth", "eval.inception_sha256=abcdef12"))


def test_wrong_hash_fails_clearly(tmp_path, random_inception):
    with pytest.raises(MetricsError, match="does not match the expected 00000000"):
        inception_weights(inception_cfg(tmp_path, random_inception, "eval.inception_sha256=00000000"))
    with pytest.raises(MetricsError, match="no hash to check it against"):
        inception_weights(inception_cfg(tmp_path, random_inception))
    assert not list((tmp_path / "node" / "weights").glob("*.pth")), "a rejected copy is not kept"


def test_training_the_classifier_shows_its_progress(capfd):
    """``cache`` trains the digits classifier for minutes on a CPU: it says so, epoch by epoch."""
    import torch

    from loomcfm_core.models.classifier import train_classifier

    train_classifier(torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8) % 2, epochs=2)
    err = capfd.readouterr().err
    assert "training the feature classifier (8 images)" in err and "2/2" in err, err
