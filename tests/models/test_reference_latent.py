"""Reference FFHQ-style checkpoints load whole: ``backbone.*`` onto our UNet, ``ae.*`` (latent-diffusion names)
onto a diffusers autoencoder built to match its keys, ``ae.scale`` honoured."""

import numpy as np
import pytest
import torch
from PIL import Image

from loomcfm_core import stages
from loomcfm_core.checkpoint import reference_parts, save_checkpoint
from loomcfm_core.cli import main
from loomcfm_core.config import load_config
from loomcfm_core.errors import CheckpointError, ConfigError
from loomcfm_core.models.autoencoder import LatentSpace, load_autoencoder
from loomcfm_core.models.loading import build_model, load_flow
from loomcfm_core.sampling import generate, sample_seeds, to_uint8
from tests.models.autoencoders import latent_config, reference_checkpoint, save_folder, tiny_kl, tiny_vq

SCALE = 0.8125


def _native(tmp_path, cfg, backbone, scale):
    """Our checkpoint of the same weights: the EMA network and the latent space it was trained in."""
    space = LatentSpace(load_autoencoder(cfg).identity, scale, "test")
    return save_checkpoint({"ema": backbone, "latent_space": space.to_dict()}, str(tmp_path / "run"), 1, 1)


def _pngs(folder):
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("0*.png"))])


@pytest.mark.parametrize("ddp", [False, True])
def test_reference_checkpoint_samples_like_the_same_weights_loaded_natively(tmp_path, ddp):
    autoencoder = tiny_kl(attention_level=3)  # the reference's KL-f8 has attention inside its last level
    cfg = latent_config(tmp_path, save_folder(autoencoder, tmp_path / "kl"), f"storage.root={tmp_path}")
    torch.manual_seed(1)
    backbone = {k: v + 0.01 * torch.randn_like(v) for k, v in build_model(cfg).state_dict().items()}
    reference = reference_checkpoint(tmp_path / "latest.pth", backbone, autoencoder, SCALE, ddp=ddp)
    native = _native(tmp_path, cfg, backbone, SCALE)

    ours, theirs = (load_flow(cfg, uri, torch.device("cpu")) for uri in (native, str(reference)))
    assert theirs.latent_space.scale == SCALE and theirs.latent_space.autoencoder["format"] == "reference_checkpoint"
    assert list(theirs.autoencoder.module.config.down_block_types)[-1] == "AttnDownEncoderBlock2D"
    seeds = sample_seeds(4)
    images = []
    for flow in (ours, theirs):
        samples = generate(flow.model, cfg.flow_shape, "euler-2", seeds, 4, "cpu")
        images.append(flow.images(samples.images, torch.device("cpu")))
    assert images[0].shape == (4, 3, 64, 64) and torch.equal(images[0], images[1])
    with torch.no_grad():  # and what the images are: the reference's decoder(post_quant_conv(z * scale))
        latents = generate(ours.model, cfg.flow_shape, "euler-2", seeds, 4, "cpu").images
        assert torch.equal(images[0], to_uint8(autoencoder.decode(latents * SCALE).sample))

    for name, uri in (("native", native), ("reference", str(reference))):
        stages.sample(cfg, uri, str(tmp_path / name), num_images=4, method="euler-2", batch_size=4, nrows=2)
    assert np.array_equal(_pngs(tmp_path / "native"), _pngs(tmp_path / "reference"))
    assert _pngs(tmp_path / "native").shape == (4, 64, 64, 3)


def test_reference_vq_checkpoint_has_no_scale(tmp_path):
    autoencoder = tiny_vq()
    cfg = latent_config(tmp_path, save_folder(autoencoder, tmp_path / "vq"), kind="vq")
    reference = reference_checkpoint(tmp_path / "latest.pth", build_model(cfg).state_dict(), autoencoder, None)
    flow = load_flow(cfg, str(reference), torch.device("cpu"))
    assert flow.latent_space.scale == 1.0 and flow.autoencoder.kind == "vq"


def test_mismatched_latent_checkpoints_are_refused(tmp_path):
    autoencoder = tiny_kl()
    cfg = latent_config(tmp_path, save_folder(autoencoder, tmp_path / "kl"))
    backbone = build_model(cfg).state_dict()
    native = _native(tmp_path, cfg, backbone, SCALE)
    with pytest.raises(ConfigError, match=r"model\.autoencoder\.scale=0\.5, but .* was trained with scale 0\.8125"):
        load_flow(latent_config(tmp_path, tmp_path / "kl", "model.autoencoder.scale=0.5"), native, "cpu")
    other = latent_config(tmp_path, save_folder(tiny_kl(seed=5), tmp_path / "other"))
    with pytest.raises(CheckpointError, match=r"was trained with the autoencoder .*/kl \(sha256 [0-9a-f]{64}\); "
                                              r"model\.autoencoder\.weights=.*/other is another"):
        load_flow(other, native, "cpu")
    pixels = latent_config(tmp_path, tmp_path / "kl", "model.autoencoder=null", "data.channels=4",
                           "data.resolution=8")
    with pytest.raises(CheckpointError, match="is a latent model: its config needs model.autoencoder"):
        load_flow(pixels, native, "cpu")
    reference = reference_checkpoint(tmp_path / "latest.pth", backbone, autoencoder, SCALE)
    with pytest.raises(ConfigError, match=r"model\.autoencoder\.kind=vq, but .*latest\.pth holds no VQ codebook"):
        load_flow(latent_config(tmp_path, tmp_path / "kl", kind="vq"), str(reference), "cpu")


def test_ffhq_reference_layout_samples_256px_images(tmp_path, capsys):
    """The reference's FFHQ layout at full size: its KL-f8 (SD's VAE plus 5 attention blocks at 32x32, 298
    tensors under ``ae.``) and ``ae.scale``; ``loomcfm sample --config ffhq256_latent --ckpt <file>`` writes
    256x256 images. Only the backbone is small (the preset's 357.9 M network is checked in test_config)."""
    autoencoder = tiny_kl(channels=(128, 256, 512, 512), layers=2, attention_level=3, size=256)
    small = ["model.channels=32", "model.channel_mult=[1,2]", "model.attn_resolutions=[]", "model.num_res_blocks=1"]
    cfg = load_config("ffhq256_latent", small)
    path = reference_checkpoint(tmp_path / "latest.pth", build_model(cfg).state_dict(), autoencoder, 0.19)
    _, ae = reference_parts(torch.load(path, weights_only=False))
    assert len(ae) == 299 and sum(".attn." in k for k in ae) == 50, "the reference kl_f8's key set and ae.scale"
    args = ["sample", "--config", "ffhq256_latent", *[a for s in small for a in ("--set", s)], "--ckpt", str(path),
            "--output", str(tmp_path / "out"), "--num_images", "1", "--method", "euler-1"]
    assert main(args) == 0, capsys.readouterr().err
    image = Image.open(tmp_path / "out" / "00000.png")
    assert image.size == (256, 256) and image.mode == "RGB"
