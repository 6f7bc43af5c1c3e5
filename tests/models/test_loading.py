"""The network of a config: built fresh, or loaded from our checkpoints and the reference implementation's."""

import pytest
import torch

from loomcfm_core.checkpoint import load_checkpoint, save_checkpoint
from loomcfm_core.config import load_config
from loomcfm_core.errors import CheckpointError
from loomcfm_core.models.loading import build_model, load_model
from loomcfm_core.models.unet import UNetModel
from tests.conftest import SMALL


def test_reference_checkpoints_load_with_their_prefixes(tmp_path, checkpoint):
    cfg = load_config("digits", SMALL)
    ema = load_checkpoint(checkpoint)["ema"]
    reference = {"model": {f"module.backbone.{k}": v for k, v in ema.items()}, "optimizer": {}, "step": 3}
    path = tmp_path / "latest.pth"
    torch.save(reference, path)
    ours, theirs = load_model(cfg, checkpoint, torch.device("cpu")), load_model(cfg, str(path), torch.device("cpu"))
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name


def test_build_model_follows_the_config():
    cfg = load_config("cifar10", ["model.channels=64", "model.channel_mult=[1,2]", "model.attn_resolutions=[16]",
                                  "model.num_res_blocks=1"])
    model = build_model(cfg)
    assert isinstance(model, UNetModel) and model.model_channels == 64
    x = torch.zeros(2, 3, 32, 32)
    assert model(x, torch.rand(2)).shape == (2, 3, 32, 32)
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == cfg.model.dropout for m in model.modules()) > 0


def test_weights_of_another_network_are_refused_naming_the_file(tmp_path):
    small = load_config("digits", SMALL)
    uri = save_checkpoint({"ema": build_model(small).state_dict()}, str(tmp_path / "run"), step=1, keep=1)
    with pytest.raises(CheckpointError, match=r"step-00000001\.pt: the weights do not fit the configured model "
                                              r"\(--config / --set model\.\*\): \d+ tensors of another shape "
                                              r"\(checkpoint vs config\), e\.g\. time_embed\.0\.weight \(128, 32\) "
                                              r"vs \(256, 64\)"):
        load_model(load_config("digits", [*SMALL, "model.channels=64"]), uri, torch.device("cpu"))
    trained = save_checkpoint({"ema": build_model(small).state_dict(), "config_yaml": small.to_yaml()},
                              str(tmp_path / "run2"), step=1, keep=1)
    with pytest.raises(CheckpointError, match=r"trained with other model\.channels \(32 -> 64\) \(checkpoint -> config\)"):
        load_model(load_config("digits", [*SMALL, "model.channels=64"]), trained, torch.device("cpu"))
    loaded = load_model(small, uri, torch.device("cpu"))
    assert not loaded.training, "a loaded model is ready to sample (eval mode: no dropout)"
