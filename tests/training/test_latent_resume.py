"""Latent training killed mid-way resumes exactly: the posterior draws' generator is part of the checkpoint."""

import os

import torch

from loomcfm_core.checkpoint import list_checkpoints, load_checkpoint
from tests.models.autoencoders import tiny_latent_yaml
from tests.training.test_driver import _cli, _finish, interrupt


def test_interrupted_latent_run_resumes_exactly(tmp_path):
    env = {**os.environ, "LOOMCFM_CONFIG_YAML": tiny_latent_yaml(tmp_path)}  # what `--config` would read
    common = ("train.max_steps=60", "train.checkpoint_every=10", "train.keep_checkpoints=2",
              "eval.feature_network=inception")  # no evaluation here: `cache` need not train the classifier
    reference = _finish(_cli(tmp_path / "a", *common, env=env))

    run_uri = interrupt(tmp_path / "b", *common, env=env)
    steps = [s for s, _ in list_checkpoints(run_uri)]
    assert 20 <= steps[-1] < 60, steps

    resumed = _finish(_cli(tmp_path / "b", *common, env=env))
    assert resumed["step"] == 60
    a, b = load_checkpoint(reference["checkpoint_uri"]), load_checkpoint(resumed["checkpoint_uri"])
    assert a["latent_space"] == b["latent_space"] and a["latent_space"]["autoencoder"]["kind"] == "kl"
    assert torch.equal(a["rng"][0]["posterior"], b["rng"][0]["posterior"]), "the same number of posterior draws"
    assert torch.equal(a["coupling"]["table"], b["coupling"]["table"])
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=0, atol=1e-6)
        torch.testing.assert_close(b["ema"][key], a["ema"][key], rtol=0, atol=1e-6)
