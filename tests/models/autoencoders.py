"""Tiny random autoencoders for the tests, in every form the loader reads (nothing is downloaded).

``to_ldm`` is the inverse of diffusers' latent-diffusion conversion, used only to *write* test files in
latent-diffusion's names (``encoder.down.{i}.block.{j}``, ``mid.attn_1``, 1x1-conv attention projections,
``nin_shortcut``, decoder levels numbered from the bottom). It was checked against the latent-diffusion
modules themselves (the names match and the outputs agree to 1e-6) in /work/notes/latent-spec.md §3.4.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from loomcfm_core.checksums import sha256_file

_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def tiny_kl(seed: int = 0, channels=(32, 32, 32, 32), groups: int = 32, attention_level: int | None = None,
            layers: int = 1, size: int = 64):
    """3x64x64 images -> 4x8x8 latents (four levels); ``attention_level`` adds attention inside that level,
    like the reference's KL-f8 at 32x32 (``channels=(128, 256, 512, 512), layers=2, attention_level=3``)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(channels)
    down = ["AttnDownEncoderBlock2D" if i == attention_level else "DownEncoderBlock2D" for i in range(n)]
    up = ["AttnUpDecoderBlock2D" if n - 1 - i == attention_level else "UpDecoderBlock2D" for i in range(n)]
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=tuple(down), up_block_types=tuple(up),
                         block_out_channels=tuple(channels), layers_per_block=layers, latent_channels=4,
                         norm_num_groups=groups, sample_size=size).eval()


def tiny_vq(seed: int = 0, channels=(32, 32, 32, 32)):
    """3x64x64 images -> 4x8x8 codebook rows (32 entries), attention inside the last level as LDM's VQ-f8."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    n = len(channels)
    return VQModel(in_channels=3, out_channels=3,
                   down_block_types=("DownEncoderBlock2D",) * (n - 1) + ("AttnDownEncoderBlock2D",),
                   up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (n - 1),
                   block_out_channels=tuple(channels), layers_per_block=1, latent_channels=4,
                   num_vq_embeddings=32, vq_embed_dim=4, norm_num_groups=32, sample_size=64).eval()


def sidecar(path: Path) -> Path:
    """Write ``<path>.sha256`` as ``loomcfm weights fetch`` would; returns ``path``."""
    Path(f"{path}.sha256").write_text(f"{sha256_file(path)}  test\n")
    return path


def save_folder(module, folder: Path) -> Path:
    """A diffusers folder (config.json + diffusion_pytorch_model.safetensors) with the weights' sidecar."""
    module.save_pretrained(folder)
    sidecar(folder / "diffusion_pytorch_model.safetensors")
    return folder


def _attention(rest: str, weight: torch.Tensor) -> tuple[str, torch.Tensor]:
    for new, old in _ATTENTION.items():
        if rest.startswith(new + "."):
            rest = old + rest[len(new):]
            break
    if rest.endswith("weight") and weight.ndim == 2 and not rest.startswith("norm"):
        weight = weight[:, :, None, None]  # latent-diffusion's attention projections are 1x1 convs
    return rest, weight


def to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers names -> latent-diffusion names (quant_conv, conv_in/out and the codebook keep theirs)."""
    out = {}
    for key, weight in state.items():
        name = key.replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", name):
            name = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", name):
            rest, weight = _attention(m[2], weight)
            name = f"{m[1]}.mid.attn_1.{rest}"
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", name):
            i, kind, j, rest = m.groups()
            if kind == "attentions":
                rest, weight = _attention(rest, weight)
            name = {"resnets": f"encoder.down.{i}.block.{j}.{rest}", "downsamplers": f"encoder.down.{i}.downsample."
                    f"{rest}", "attentions": f"encoder.down.{i}.attn.{j}.{rest}"}[kind]
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", name):
            i, kind, j, rest = m.groups()
            level = levels - 1 - int(i)
            if kind == "attentions":
                rest, weight = _attention(rest, weight)
            name = {"resnets": f"decoder.up.{level}.block.{j}.{rest}", "upsamplers": f"decoder.up.{level}.upsample."
                    f"{rest}", "attentions": f"decoder.up.{level}.attn.{j}.{rest}"}[kind]
        out[name.replace("conv_shortcut", "nin_shortcut")] = weight.clone()
    return out


def save_ldm(module, path: Path, prefix: str = "") -> Path:
    """A latent-diffusion single file: ``{"state_dict": ...}`` for .ckpt, flat for .safetensors; with sidecar."""
    levels = len(module.config.block_out_channels)
    ldm = {prefix + k: v.contiguous() for k, v in to_ldm(module.state_dict(), levels).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(ldm, path)
    else:
        torch.save({"state_dict": ldm, "global_step": 1}, path)
    return sidecar(path)


def reference_checkpoint(path: Path, backbone: dict[str, torch.Tensor], autoencoder=None, scale: float | None = None,
                         ddp: bool = False) -> Path:
    """A checkpoint in the reference implementation's layout: ``model`` holds ``backbone.*`` and, for a latent
    model, ``ae.*`` (latent-diffusion names, ``ae.scale`` for KL), beside its optimizer and step."""
    model = {f"backbone.{k}": v for k, v in backbone.items()}
    if autoencoder is not None:
        model.update({f"ae.{k}": v for k, v in to_ldm(autoencoder.state_dict(),
                                                     len(autoencoder.config.block_out_channels)).items()})
    if scale is not None:
        model["ae.scale"] = torch.tensor([scale])
    if ddp:
        model = {f"module.{k}": v for k, v in model.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "optimizer": {}, "lr_scheduler": {}, "global_step": 10}, path)
    return path


# A 64x64 RGB config training on tiny-autoencoder latents (4x8x8) with a network small enough for a CPU test.
LATENT = ["data.channels=3", "data.resolution=64", "model.channels=32", "model.channel_mult=[1,2]",
          "model.attn_resolutions=[]", "model.autoencoder.latent_channels=4", "model.autoencoder.downsample=8"]


def latent_config(tmp_path: Path, weights: Path | str, *overrides: str, kind: str = "kl"):
    """The ``LATENT`` config with ``weights`` as its autoencoder, node-local copies under ``tmp_path``."""
    from loomcfm_core.config import load_config

    return load_config("digits", [*LATENT, f"model.autoencoder.kind={kind}", f"model.autoencoder.weights={weights}",
                                  f"data.local_cache={tmp_path / 'node'}", *overrides])


def tiny_latent_yaml(root: Path) -> str:
    """A whole latent run's config as YAML text: a generated 64x64 ImageFolder (24 + 24 train images, 8 + 8
    val) under ``root/shapes``, a fast tiny KL autoencoder (8/16/16/16 channels) under ``root/kl``, LOOM with
    two seeds per point, FD on the features of the classifier ``cache`` trains, and reflow on latent pairs."""
    import yaml

    from tests.data.shapes import shapes_folder

    images = shapes_folder(root / "shapes", train_per_class=24, val_per_class=8)
    weights = save_folder(tiny_kl(channels=(8, 16, 16, 16), groups=4), root / "kl")
    return yaml.safe_dump({
        "extends": "digits", "name": "tinylatent",
        "data": {"name": "shapes", "source": f"imagefolder:{images}", "channels": 3, "resolution": 64,
                 "hflip": True, "num_workers": 0},
        "model": {"channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                  "autoencoder": {"kind": "kl", "weights": str(weights), "latent_channels": 4, "downsample": 8,
                                  "batch_size": 64}},
        "coupling": {"kind": "loom", "num_seeds": 2},
        "train": {"batch_size": 16, "max_steps": 40, "lr": 1e-3, "warmup_steps": 10, "checkpoint_every": 20,
                  "log_every": 10},
        "sample": {"batch_size": 64},
        "eval": {"methods": ["euler-1", "euler-4"], "num_samples": 64, "batch_size": 64,
                 "feature_network": "classifier"},
        "reflow": {"method": "euler-4", "num_pairs": 64, "batch_size": 16, "max_steps": 20, "warmup_steps": 5},
        "ray": {"cpus_per_worker": 1},
    })
