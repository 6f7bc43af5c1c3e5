"""An ADM ("guided diffusion") UNet, written for this project.

Module names and the attention head layout follow the ADM ``UNetModel`` (``time_embed``, ``input_blocks``,
``middle_block``, ``output_blocks``, ``out``; residual blocks with ``in_layers``/``emb_layers``/
``out_layers``/``skip_connection``; attention with ``norm``/``qkv``/``proj_out`` and the legacy head order),
so the reference implementation's published checkpoints load after stripping their ``backbone.`` prefix.
The network sees raw t in [0, 1], embedded sinusoidally (max period 10000).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loomcfm_core.config import ModelConfig
from loomcfm_core.errors import UsageError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32, which keeps bf16 autocast training stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> nn.GroupNorm:
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Residual branches start as the identity: their last layer is initialised to zero."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepBlock(nn.Module):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequence whose residual blocks also receive the time embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class ResBlock(TimestepBlock):
    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention over spatial positions with the legacy head order (split heads, then q, k, v)."""

    def __init__(self, channels: int, num_head_channels: int) -> None:
        super().__init__()
        if channels % num_head_channels:
            raise UsageError(f"model.num_head_channels={num_head_channels} does not divide the attention width "
                             f"{channels} (model.channels x model.channel_mult at an attention resolution)")
        self.num_heads = channels // num_head_channels
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        length = qkv.shape[-1]
        q, k, v = qkv.reshape(b * self.num_heads, 3 * c // self.num_heads, length).chunk(3, dim=1)
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = h.transpose(1, 2).reshape(b, c, length)
        return (flat + self.proj_out(h)).reshape(b, c, *spatial)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNetModel(nn.Module):
    """Velocity network v(x_t, t) with the input's shape.

    ``attn_resolutions`` are feature-map sizes (16 means attention where maps are 16x16), not the
    downsampling rates the ADM configs use.
    """

    def __init__(self, in_channels: int, resolution: int, model_channels: int, channel_mult: list[int],
                 num_res_blocks: int, attn_resolutions: list[int], num_head_channels: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        emb_channels = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_channels), nn.SiLU(),
                                        nn.Linear(emb_channels, emb_channels))
        self.model_channels = model_channels

        def attention(ch: int, size: int) -> list[nn.Module]:
            return [AttentionBlock(ch, num_head_channels)] if size in attn_resolutions else []

        ch = input_ch = channel_mult[0] * model_channels
        size = resolution
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb_channels, dropout, mult * model_channels)]
                ch = mult * model_channels
                self.input_blocks.append(TimestepEmbedSequential(*layers, *attention(ch, size)))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                size //= 2
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_channels, dropout),
                                                    AttentionBlock(ch, num_head_channels),
                                                    ResBlock(ch, emb_channels, dropout))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_channels, dropout, mult * model_channels)]
                ch = mult * model_channels
                layers += attention(ch, size)
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    size *= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(input_ch, in_channels, 3, padding=1)))

    @classmethod
    def from_config(cls, model: ModelConfig, in_channels: int, resolution: int) -> UNetModel:
        return cls(in_channels, resolution, model.channels, model.channel_mult, model.num_res_blocks,
                   model.attn_resolutions, model.num_head_channels, model.dropout)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).type(x.dtype)
