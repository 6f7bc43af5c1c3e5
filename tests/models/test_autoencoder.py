"""Autoencoders from a path: diffusers folders, latent-diffusion single files and reference checkpoints load
strictly into diffusers' modules and give the same latents."""

import json

import pytest
import torch

from loomcfm_core.errors import CheckpointError, ConfigError
from loomcfm_core.models.autoencoder import LatentSpace, load_autoencoder
from loomcfm_core.models.ldm_conversion import config_from_ldm
from tests.models.autoencoders import latent_config, save_folder, save_ldm, sidecar, tiny_kl, tiny_vq, to_ldm


def _images(n=4, seed=1):
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("form", ["folder", "ldm.ckpt", "ldm.safetensors", "sd.ckpt"])
def test_every_form_gives_the_latents_of_the_original(tmp_path, form):
    original = tiny_kl(attention_level=3 if form == "ldm.ckpt" else None)
    if form == "folder":
        weights = save_folder(original, tmp_path / "kl")
    else:  # "sd": the autoencoder inside a whole Stable Diffusion checkpoint, under first_stage_model.
        prefix = "first_stage_model." if form == "sd.ckpt" else ""
        weights = save_ldm(original, tmp_path / f"kl.{form.split('.')[1]}", prefix)
    loaded = load_autoencoder(latent_config(tmp_path, weights))
    x = _images()
    with torch.no_grad():
        posterior = original.encode(x).latent_dist
        expected = torch.stack([posterior.mean, posterior.std], 1)
        assert torch.equal(loaded.encode(x), expected)
        assert torch.equal(loaded.decode(posterior.mean, "cpu"), original.decode(posterior.mean).sample)
    assert loaded.identity["format"] == ("diffusers" if form == "folder" else "ldm")
    assert (loaded.identity["latent_channels"], loaded.identity["downsample"]) == (4, 8)


def test_folder_and_single_file_load_to_the_same_module(tmp_path):
    original = tiny_kl(attention_level=3)
    folder = load_autoencoder(latent_config(tmp_path, save_folder(original, tmp_path / "kl")))
    single = load_autoencoder(latent_config(tmp_path, save_ldm(original, tmp_path / "kl.ckpt")))
    a, b = folder.module.state_dict(), single.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert list(folder.module.config.down_block_types) == list(single.module.config.down_block_types)


def test_config_is_read_off_the_shapes(tmp_path):
    original = tiny_kl(channels=(32, 64, 64, 96), attention_level=2)
    config = config_from_ldm(to_ldm(original.state_dict(), 4), "kl")
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        assert list(config[key]) == list(original.config[key]), key
    for key in ("layers_per_block", "latent_channels", "in_channels", "out_channels", "norm_num_groups"):
        assert config[key] == original.config[key], key
    assert config["up_block_types"] == ("UpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D",
                                        "UpDecoderBlock2D")


def test_vq_stores_codebook_rows_and_decodes_quantising(tmp_path):
    original = tiny_vq()
    folder = load_autoencoder(latent_config(tmp_path, save_folder(original, tmp_path / "vq"), kind="vq"))
    single = load_autoencoder(latent_config(tmp_path, save_ldm(original, tmp_path / "vq.ckpt"), kind="vq"))
    x = _images()
    rows = folder.encode(x)
    assert rows.shape == (4, 4, 8, 8) and torch.equal(rows, single.encode(x))
    codebook = original.quantize.embedding.weight
    flat = rows.permute(0, 2, 3, 1).reshape(-1, 4)
    assert (torch.cdist(flat, codebook).min(1).values == 0).all(), "every latent is a codebook row"
    with torch.no_grad():
        pre = original.encode(x).latents
        assert torch.allclose(folder.decode(pre, "cpu"), original.decode(pre).sample)  # quantises first


def test_a_missing_tensor_is_an_error_naming_file_and_key(tmp_path):
    ldm = to_ldm(tiny_kl().state_dict(), 4)
    del ldm["decoder.conv_out.weight"]
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": ldm}, path)
    with pytest.raises(CheckpointError, match=r"broken\.ckpt.*lack.*decoder\.conv_out\.weight"):
        load_autoencoder(latent_config(tmp_path, sidecar(path)))
    del ldm["encoder.down.1.block.0.conv2.weight"]  # with the config given, the shapes are not needed
    torch.save({"state_dict": ldm}, path)
    save_folder(tiny_kl(), tmp_path / "cfg")
    with pytest.raises(CheckpointError, match=r"broken\.ckpt: weights do not fit the autoencoder's config: 2 "
                                              r"missing \['decoder\.conv_out\.weight', "
                                              r"'encoder\.down_blocks\.1\.resnets\.0\.conv2\.weight'\]"):
        load_autoencoder(latent_config(tmp_path, sidecar(path), f"model.autoencoder.config={tmp_path / 'cfg'}"))


def test_a_config_of_other_shapes_is_an_error_naming_the_file(tmp_path):
    path = save_ldm(tiny_kl(), tmp_path / "kl.safetensors")
    config = dict(tiny_kl(channels=(64, 64, 64, 64)).config)  # same tensors, other sizes
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"kl\.safetensors: weights do not fit the autoencoder's config: "
                                              r"size mismatch"):
        load_autoencoder(latent_config(tmp_path, path, f"model.autoencoder.config={tmp_path / 'config.json'}"))


def test_weights_are_checked_by_sha256(tmp_path):
    folder = save_folder(tiny_kl(), tmp_path / "kl")
    with pytest.raises(CheckpointError, match="checksum mismatch: .* does not match the expected 00000000"):
        load_autoencoder(latent_config(tmp_path, folder, "model.autoencoder.sha256=00000000"))
    (folder / "diffusion_pytorch_model.safetensors.sha256").unlink()
    with pytest.raises(CheckpointError, match=r"no hash to check it against; set model\.autoencoder\.sha256"):
        load_autoencoder(latent_config(tmp_path, folder))
    with pytest.raises(CheckpointError, match=r"model\.autoencoder\.weights=.*nope: no such file"):
        load_autoencoder(latent_config(tmp_path, tmp_path / "nope"))


def test_the_config_must_describe_the_weights(tmp_path):
    folder = save_folder(tiny_kl(), tmp_path / "kl")
    with pytest.raises(ConfigError, match=r"model\.autoencoder\.kind=vq, but .* holds no VQ codebook"):
        load_autoencoder(latent_config(tmp_path, folder, kind="vq"))
    with pytest.raises(ConfigError, match=r"model\.autoencoder\.downsample=16, but the autoencoder at .* has 8"):
        load_autoencoder(latent_config(tmp_path, folder, "model.autoencoder.downsample=16"))
    with pytest.raises(ConfigError, match=r"model\.autoencoder\.config: .* is a diffusers folder"):
        load_autoencoder(latent_config(tmp_path, folder, f"model.autoencoder.config={folder}"))


def test_latent_space_params_name_identity_and_scale():
    space = LatentSpace({"kind": "kl", "weights": "s3://b/vae", "sha256": "ab" * 32, "latent_channels": 4},
                        0.25, "model.autoencoder.scale")
    params = space.params()
    assert params["autoencoder.weights"] == "s3://b/vae" and params["autoencoder.sha256"] == "ab" * 32
    assert params["autoencoder.scale"] == "0.25" and params["autoencoder.latent_channels"] == "4"
    assert LatentSpace.from_dict(space.to_dict()) == space
