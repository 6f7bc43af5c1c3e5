"""Pretrained autoencoders from a path, through diffusers' ``AutoencoderKL`` and ``VQModel``; never downloaded.

Three forms of weights, told apart by what ``model.autoencoder.weights`` holds:

- ``diffusers``: a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``);
- ``ldm``: a latent-diffusion / Stable Diffusion single file (``.ckpt``, ``.pt``, ``.safetensors``; a whole
  SD checkpoint works too), renamed by :mod:`loomcfm_core.models.ldm_conversion`, its config from
  ``model.autoencoder.config`` or from its tensors' shapes;
- ``reference_checkpoint``: a reference LOOM-CFM checkpoint, whose ``ae.*`` tensors are such a first stage
  and whose ``ae.scale`` is the scale its flow was trained with.

Every form loads strictly (a missing or unexpected tensor is an error naming the file), after its file
matched its sha256. The autoencoder's identity (kind, format, URI, sha256, ...) and the scale travel with
the latents as a :class:`LatentSpace`: in the latent dataset's manifest, in every checkpoint trained on
them, in reflow pairs and in MLflow params. diffusers is imported only in here, and only when needed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from loomcfm_core.checkpoint import reference_parts
from loomcfm_core.checksums import expected_sha256, fetch_verified, sha256_file
from loomcfm_core.errors import CheckpointError, ConfigError
from loomcfm_core.models.ldm_conversion import (CODEBOOK, block_types, config_from_ldm, convert_ldm_first_stage,
                                                first_stage, is_ldm_layout)
from loomcfm_core.storage import join, storage_for

if TYPE_CHECKING:
    from loomcfm_core.config import Config

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # in a diffusers folder


@dataclass
class LatentSpace:
    """What a latent flow's samples mean: the autoencoder (its identity) and the scale (the flow sees
    ``z / scale``); ``scale_source`` says where the scale came from."""

    autoencoder: dict
    scale: float
    scale_source: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LatentSpace:
        return cls(**data)

    def params(self) -> dict[str, str]:
        """MLflow params: the identity and the scale in effect, under ``autoencoder.*`` (the config's own
        ``model.autoencoder.scale`` may be null, and a param never changes once logged)."""
        values = {**self.autoencoder, "scale": self.scale, "scale_source": self.scale_source}
        return {f"autoencoder.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


class Autoencoder:
    """A frozen diffusers autoencoder and the two things latent training needs from it.

    Args:
        identity: kind, format, weights URI, sha256, config and the latent geometry.
        own_scale: the scale that came with the weights (a reference checkpoint's ``ae.scale``).
    """

    def __init__(self, module: torch.nn.Module, identity: dict, own_scale: float | None = None) -> None:
        self.module = module.eval().requires_grad_(False)
        self.identity, self.own_scale = identity, own_scale
        self.kind = identity["kind"]

    def check(self, cfg: Config) -> None:
        """The weights are what the config says they are: image channels and the latent geometry the flow's
        shape is computed from (``Config.flow_shape``)."""
        ae, config = cfg.model.autoencoder, self.module.config
        found = {"latent_channels": self.identity["latent_channels"], "downsample": self.identity["downsample"]}
        for key, value in found.items():
            if getattr(ae, key) != value:
                raise ConfigError(f"model.autoencoder.{key}={getattr(ae, key)}, but the autoencoder at "
                                  f"{ae.weights} has {value}")
        if config.in_channels != cfg.data.channels:
            raise ConfigError(f"data.channels={cfg.data.channels}, but the autoencoder at {ae.weights} encodes "
                              f"{config.in_channels}-channel images")

    def to(self, device: torch.device | str) -> Autoencoder:
        self.module.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """What the latent cache stores for images in [-1, 1] on the module's device.

        Returns:
            KL: ``[B, 2, C, h, w]``, the posterior's mean and standard deviation. VQ: ``[B, C, h, w]``,
            the quantised latents (the codebook rows the decoder reads).
        """
        if self.kind == "kl":
            posterior = self.module.encode(images).latent_dist
            return torch.stack([posterior.mean, posterior.std], dim=1)
        latents = self.module.encode(images).latents
        _, _, (_, _, indices) = self.module.quantize(latents)
        b, c, h, w = latents.shape
        return self.module.quantize.get_codebook_entry(indices.reshape(-1), (b, h, w, c))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """Images in about [-1, 1] (float32, on the CPU) of one batch of unscaled latents. A VQ decoder
        quantises first, as latent diffusion's does."""
        return self.to(device).module.decode(latents.to(device)).sample.float().cpu()


def read_weights(path: Path, origin: str) -> object:
    """A weights file's contents, loaded without unpickling code (a Lightning ``state_dict`` wrapper removed)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors and torch.load raise many types for a bad file
        raise CheckpointError(f"{origin}: cannot read autoencoder weights ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]}); a .safetensors file avoids pickles") from exc
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def build(kind: str, weights: dict[str, torch.Tensor], config: dict | None, identity: dict,
          origin: str) -> Autoencoder:
    """A diffusers autoencoder holding exactly ``weights`` (latent-diffusion names are converted first).

    Args:
        config: a diffusers config; None for latent-diffusion weights derives it from their shapes. The block
            types of latent-diffusion weights always follow their tensors, so a level's extra attention (the
            reference's KL-f8) is built wherever the file has it.
    """
    import diffusers
    from diffusers import AutoencoderKL, VQModel

    weights = dict(weights)
    scale = weights.pop("scale", None)
    ldm_names = is_ldm_layout(weights)
    weights = first_stage(weights) if ldm_names else weights
    if (CODEBOOK in weights) != (kind == "vq"):
        found = "a VQ codebook" if CODEBOOK in weights else "no VQ codebook"
        raise ConfigError(f"model.autoencoder.kind={kind}, but {origin} holds {found}")
    if ldm_names:
        ldm = weights
        try:
            config = dict(config or config_from_ldm(ldm, kind))
            config["down_block_types"], config["up_block_types"] = block_types(ldm)
        except CheckpointError as exc:
            raise CheckpointError(f"{origin}: {exc}") from exc
        weights = convert_ldm_first_stage(ldm, config)
    elif config is None:
        raise ConfigError(f"{origin} holds diffusers names: give its config.json as model.autoencoder.config")
    module = (VQModel if kind == "vq" else AutoencoderKL).from_config(config)
    expected, got = set(module.state_dict()), set(weights)
    if expected != got:
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        raise CheckpointError(f"{origin}: weights do not fit the autoencoder's config: {len(missing)} missing "
                              f"{missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}")
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{origin}: weights do not fit the autoencoder's config: "
                              f"{str(exc).splitlines()[-1].strip()}") from exc
    levels = len(module.config.block_out_channels)
    channels = (module.config.vq_embed_dim or module.config.latent_channels) if kind == "vq" else \
        module.config.latent_channels
    identity = {**identity, "latent_channels": channels, "downsample": 2 ** (levels - 1),
                "diffusers": diffusers.__version__}
    return Autoencoder(module, identity, None if scale is None else float(scale.reshape(-1)[0]))


@dataclass
class WeightsLocation:
    """Where ``model.autoencoder`` points, resolved without reading the weights: what the latent cache's key
    is made of."""

    weights_uri: str
    config_uri: str | None
    expected_sha256: str
    folder: bool


def locate(cfg: Config) -> WeightsLocation:
    """The weights file (a diffusers folder's, or the single file), its config and the sha256 it must have."""
    ae = cfg.model.autoencoder
    store = storage_for(ae.weights)
    if store.exists(join(ae.weights, "config.json")):
        if ae.config:
            raise ConfigError(f"model.autoencoder.config: {ae.weights} is a diffusers folder with its own "
                              "config.json; leave model.autoencoder.config null")
        names = [n for n in WEIGHT_FILES if store.exists(join(ae.weights, n))]
        if not names:
            raise CheckpointError(f"model.autoencoder.weights={ae.weights}: a diffusers folder without "
                                  f"{' or '.join(WEIGHT_FILES)}")
        weights_uri, config_uri, folder = join(ae.weights, names[0]), join(ae.weights, "config.json"), True
    elif store.exists(ae.weights):
        weights_uri, config_uri, folder = ae.weights, None, False
        if ae.config:
            inside = join(ae.config, "config.json")
            config_uri = inside if storage_for(inside).exists(inside) else ae.config
    else:
        raise CheckpointError(f"model.autoencoder.weights={ae.weights}: no such file or diffusers folder")
    expected = expected_sha256(weights_uri, ae.sha256, name=f"model.autoencoder.weights={weights_uri}",
                               key="model.autoencoder.sha256", error=CheckpointError)
    return WeightsLocation(weights_uri, config_uri, expected, folder)


def load_autoencoder(cfg: Config) -> Autoencoder:
    """``model.autoencoder``: its weights file checked by sha256 and copied once to ``data.local_cache``."""
    ae, where = cfg.model.autoencoder, locate(cfg)
    local = Path(cfg.data.local_cache).expanduser() / "weights" / f"autoencoder-{where.expected_sha256[:16]}" / \
        where.weights_uri.rstrip("/").rsplit("/", 1)[-1]
    fetch_verified(where.weights_uri, local, where.expected_sha256,
                   name=f"model.autoencoder.weights={where.weights_uri}", error=CheckpointError,
                   hint="the file is corrupt or not the configured autoencoder")
    config_text = storage_for(where.config_uri).read_text(where.config_uri) if where.config_uri else None
    state = read_weights(local, where.weights_uri)
    _, reference_ae = reference_parts(state)
    weights = reference_ae or state
    form = "diffusers" if where.folder else "reference_checkpoint" if reference_ae else \
        "ldm" if is_ldm_layout(weights) else "diffusers"
    identity = {"kind": ae.kind, "format": form, "weights": ae.weights, "sha256": sha256_file(local),
                "config": where.config_uri,
                "config_sha256": hashlib.sha256(config_text.encode()).hexdigest() if config_text else None}
    autoencoder = build(ae.kind, weights, json.loads(config_text) if config_text else None, identity,
                        where.weights_uri)
    autoencoder.check(cfg)
    return autoencoder
