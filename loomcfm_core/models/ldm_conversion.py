"""Latent-diffusion / Stable Diffusion first-stage weights onto diffusers' autoencoders, offline.

diffusers' own ``convert_ldm_vae_checkpoint`` renames the KL-f8 layout, and ``update_vae_attentions_ldm_to_
diffusers`` renames attention blocks. Two things it leaves out are added here with the same helpers:
attention blocks *inside* a level (``encoder.down.{i}.attn.{j}``, ``decoder.up.{i}.attn.{j}``: every LDM VQ
model has them, and so does the reference implementation's KL-f8, which builds them at 32x32 on top of the
SD VAE) and the VQ codebook. The diffusers config a file needs is read off its tensors' shapes, so nothing
is fetched (``from_single_file`` would ask the Hub for one, and loads without strictness).

diffusers is imported inside the functions: it costs seconds, and only latent runs need it.
"""

from __future__ import annotations

import re

import torch

from loomcfm_core.errors import CheckpointError

LDM_PREFIXES = ("first_stage_model.", "vae.")  # where a whole SD / LDM checkpoint keeps its autoencoder
CODEBOOK = "quantize.embedding.weight"
LDM_NORM_GROUPS = 32  # latent-diffusion's Normalize() is GroupNorm(32) everywhere
_LEVEL_ATTENTION = re.compile(r"^(encoder\.down|decoder\.up)\.\d+\.attn\.")


def is_ldm_layout(weights: dict[str, torch.Tensor]) -> bool:
    """Whether the names are latent-diffusion's (``encoder.down.0.block.0...``), not diffusers'."""
    return any(k.startswith(("encoder.down.", "decoder.up.")) for k in first_stage(weights))


def first_stage(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The autoencoder's tensors without their prefix (a whole SD checkpoint keeps them under one)."""
    for prefix in LDM_PREFIXES:
        if any(k.startswith(prefix) for k in weights):
            return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    return dict(weights)


def _levels(ldm: dict[str, torch.Tensor]) -> int:
    found = {int(m.group(1)) for k in ldm if (m := re.match(r"encoder\.down\.(\d+)\.", k))}
    if not found:
        raise CheckpointError("no encoder.down.<level> tensors: not a latent-diffusion first-stage model")
    return max(found) + 1


def block_types(ldm: dict[str, torch.Tensor]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """diffusers' ``down_block_types`` and ``up_block_types``: a level with attention tensors gets an Attn block.

    diffusers' ``up_blocks[i]`` is latent-diffusion's decoder level ``n - 1 - i``.
    """
    n = _levels(ldm)
    down = tuple("AttnDownEncoderBlock2D" if any(k.startswith(f"encoder.down.{i}.attn.") for k in ldm)
                 else "DownEncoderBlock2D" for i in range(n))
    up = tuple("AttnUpDecoderBlock2D" if any(k.startswith(f"decoder.up.{n - 1 - i}.attn.") for k in ldm)
               else "UpDecoderBlock2D" for i in range(n))
    return down, up


def config_from_ldm(ldm: dict[str, torch.Tensor], kind: str) -> dict:
    """The diffusers config of latent-diffusion weights, read off the tensors' shapes.

    Everything but the GroupNorm group count is visible in the shapes; latent-diffusion always uses 32.
    """
    try:
        n = _levels(ldm)
        down, up = block_types(ldm)
        config = {
            "in_channels": ldm["encoder.conv_in.weight"].shape[1],
            "out_channels": ldm["decoder.conv_out.weight"].shape[0],
            "down_block_types": down, "up_block_types": up,
            "block_out_channels": tuple(ldm[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(n)),
            "layers_per_block": len({k.split(".")[4] for k in ldm if k.startswith("encoder.down.0.block.")}),
            "latent_channels": ldm["decoder.conv_in.weight"].shape[1],
            "norm_num_groups": LDM_NORM_GROUPS, "scaling_factor": 1.0,
            "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in ldm,
        }
        if kind == "vq":
            config.update(num_vq_embeddings=ldm[CODEBOOK].shape[0], vq_embed_dim=ldm[CODEBOOK].shape[1],
                          latent_channels=ldm["encoder.conv_out.weight"].shape[0])
        else:
            config.update(use_quant_conv="quant_conv.weight" in ldm,
                          use_post_quant_conv="post_quant_conv.weight" in ldm)
    except KeyError as exc:
        raise CheckpointError(f"latent-diffusion weights lack {exc.args[0]}: cannot derive the autoencoder's "
                              "config (give model.autoencoder.config)") from exc
    return config


def convert_ldm_first_stage(ldm: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers' converter, plus the per-level attention blocks and the VQ codebook it leaves out.

    Args:
        ldm: latent-diffusion names without a prefix (:func:`first_stage`).
        config: the diffusers config the result is loaded into (its block types and level count).
    """
    from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                     update_vae_attentions_ldm_to_diffusers)

    # The converter copies per-level attention tensors through under their old names; rename them here.
    converted = {k: v for k, v in convert_ldm_vae_checkpoint(ldm, config).items() if not _LEVEL_ATTENTION.match(k)}
    n = len(config["down_block_types"])
    for i in range(n):
        level = n - 1 - i
        update_vae_attentions_ldm_to_diffusers([k for k in ldm if k.startswith(f"encoder.down.{i}.attn.")],
                                               converted, ldm, {"old": f"down.{i}.attn",
                                                                "new": f"down_blocks.{i}.attentions"})
        update_vae_attentions_ldm_to_diffusers([k for k in ldm if k.startswith(f"decoder.up.{level}.attn.")],
                                               converted, ldm, {"old": f"up.{level}.attn",
                                                                "new": f"up_blocks.{i}.attentions"})
    if CODEBOOK in ldm:
        converted[CODEBOOK] = ldm[CODEBOOK]
    return converted
