"""The velocity network of a config, fresh or with a checkpoint's EMA weights, and where to run it.

Training builds the network here and evaluation, reflow pairs, sampling and model registration load it
here, so every stage means the same network by the same config. A latent model's checkpoint also says
which autoencoder and scale its samples belong to; :func:`load_flow` brings the decoder along.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from loomcfm_core.checkpoint import SamplingWeights, read_sampling_weights
from loomcfm_core.config import Config, load_config_text
from loomcfm_core.errors import CheckpointError, ConfigError, UsageError
from loomcfm_core.identity import changed_keys, describe
from loomcfm_core.models.autoencoder import Autoencoder, LatentSpace, build, load_autoencoder
from loomcfm_core.models.unet import UNetModel
from loomcfm_core.sampling import to_uint8

SHAPE_KEYS = ("data.channels", "data.resolution")  # besides model.*: what the weights' shapes depend on
SHOWN = 3  # examples of each kind of mismatch in a message


def default_device() -> torch.device:
    """The GPU when there is one: sampling and scoring are the work a GPU is for."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(cfg: Config) -> UNetModel:
    """A freshly initialised network for the shape the flow sees (``Config.flow_shape``) and ``model``.

    Raises:
        ConfigError: ``model.*`` describes no network (e.g. heads that do not divide a width).
    """
    channels, resolution, _ = cfg.flow_shape
    try:
        return UNetModel.from_config(cfg.model, channels, resolution)
    except UsageError as exc:
        raise ConfigError(str(exc)) from exc


def check_buildable(cfg: Config) -> None:
    """Build the network on the ``meta`` device (no memory, no time): a config that describes no network
    fails here, in the process that starts a stage, rather than in every worker it would start."""
    with torch.device("meta"):
        build_model(cfg)


def _saved_flat(config_yaml: str | None) -> dict:
    """A checkpoint's own config, flattened ({} when it has none or one this version cannot read)."""
    try:
        return load_config_text(config_yaml).flat() if config_yaml else {}
    except ConfigError:
        return {}


def weights_mismatch(cfg: Config, weights: dict[str, torch.Tensor], config_yaml: str | None = None) -> str | None:
    """Why ``weights`` do not fit the config's network (None when they do): images of another size or channel
    count than the checkpoint's own config (ours carry it) names, even when the tensors happen to fit; else,
    when they do not, the differing ``model.*`` keys, or the missing, unexpected and reshaped tensors."""
    keys = {k: v for changes in changed_keys(_saved_flat(config_yaml), cfg.flat()).values()
            for k, v in changes.items() if k.startswith("model.") or k in SHAPE_KEYS}
    trained_with = f"it was trained with other {describe(keys)} (checkpoint -> config)"
    if keys.keys() & set(SHAPE_KEYS):  # a fully convolutional network's tensors may fit images it never saw
        return trained_with
    with torch.device("meta"):
        expected = {k: v.shape for k, v in build_model(cfg).state_dict().items()}
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k])}" for k in expected
                if k in weights and weights[k].shape != expected[k]]
    if not (missing or unexpected or reshaped):
        return None
    if keys:
        return trained_with
    parts = [f"{len(found)} {what}, e.g. {', '.join(found[:SHOWN])}" for what, found in
             (("tensors of another shape (checkpoint vs config)", reshaped), ("missing", missing),
              ("unexpected", unexpected)) if found]
    return "; ".join(parts)


def fitting_weights(cfg: Config, checkpoint_uri: str) -> SamplingWeights:
    """The sampling weights of a checkpoint (ours or the reference implementation's), checked against the
    configured network; a stage calls this before any other work, so a wrong checkpoint fails first.

    Raises:
        CheckpointError: no checkpoint there, not a checkpoint, or weights that do not fit the configured
            model (the message names the differing config keys or tensors).
    """
    weights = read_sampling_weights(checkpoint_uri)
    why = weights_mismatch(cfg, weights.backbone, weights.config_yaml)
    if why:
        raise CheckpointError(f"{checkpoint_uri}: the weights do not fit the configured model (--config / "
                              f"--set model.*): {why}")
    return weights


@dataclass
class Flow:
    """A checkpoint's EMA network and, for a latent model, its latent space and (when asked for) decoder."""

    model: UNetModel
    latent_space: LatentSpace | None = None
    autoencoder: Autoencoder | None = None
    batch_size: int = 1  # images per decode batch (model.autoencoder.batch_size)

    def images(self, samples: torch.Tensor, device: torch.device) -> torch.Tensor:
        """uint8 images of the flow's samples: the samples themselves in pixel space, else ``decode(z * scale)``
        batch by batch (50,000 decoded 256x256 images are 9.8 GB as uint8, four times that as floats)."""
        if self.autoencoder is None:
            return to_uint8(samples)
        size, scale = self.batch_size, self.latent_space.scale
        return torch.cat([to_uint8(self.autoencoder.decode(samples[i:i + size] * scale, device))
                          for i in tqdm(range(0, len(samples), size), desc="decoding", unit="batch", leave=False,
                                        dynamic_ncols=True)])


def _latent_space(cfg: Config, uri: str, weights: SamplingWeights,
                  decoder: bool) -> tuple[LatentSpace, Autoencoder | None]:
    """The latent space a checkpoint was trained in and, if ``decoder`` (always for a reference checkpoint,
    whose autoencoder is the only record of its identity), the autoencoder."""
    ae = cfg.model.autoencoder
    if weights.autoencoder is not None:  # a reference checkpoint carries its autoencoder (ae.*, ae.scale)
        identity = {"kind": ae.kind, "format": "reference_checkpoint", "weights": uri, "sha256": weights.sha256,
                    "config": None, "config_sha256": None}
        autoencoder = build(ae.kind, weights.autoencoder, None, identity, uri)
        autoencoder.check(cfg)
        scale = autoencoder.own_scale or 1.0  # a reference VQ model has no ae.scale: its latents are unscaled
        space = LatentSpace(autoencoder.identity, scale, "the checkpoint's ae.scale" if autoencoder.own_scale
                            else "1 (the reference's VQ models are unscaled)")
        return space, autoencoder
    if weights.latent_space is None:
        raise CheckpointError(f"{uri} was trained in pixel space, but the config has model.autoencoder: use the "
                              "config it was trained with")
    space = LatentSpace.from_dict(weights.latent_space)
    autoencoder = load_autoencoder(cfg) if decoder else None
    if autoencoder is not None and autoencoder.identity["sha256"] != space.autoencoder["sha256"]:
        raise CheckpointError(f"{uri} was trained with the autoencoder {space.autoencoder['weights']} (sha256 "
                              f"{space.autoencoder['sha256']}); model.autoencoder.weights={ae.weights} is another "
                              f"(sha256 {autoencoder.identity['sha256']})")
    return space, autoencoder


def load_flow(cfg: Config, checkpoint_uri: str, device: torch.device, decoder: bool = True) -> Flow:
    """The EMA network of a checkpoint (ours or the reference implementation's), ready to sample, with its
    latent space and, if ``decoder``, the autoencoder that turns samples into images.

    Raises:
        CheckpointError: see :func:`fitting_weights`; or the checkpoint's latent space is not the configured one.
    """
    weights = fitting_weights(cfg, checkpoint_uri)
    model = build_model(cfg)
    model.load_state_dict(weights.backbone)
    model.to(device).eval()
    ae = cfg.model.autoencoder
    if ae is None:
        if weights.latent_space is not None or weights.autoencoder is not None:
            raise CheckpointError(f"{checkpoint_uri} is a latent model: its config needs model.autoencoder")
        return Flow(model)
    space, autoencoder = _latent_space(cfg, checkpoint_uri, weights, decoder)
    if ae.scale is not None and ae.scale != space.scale:
        raise ConfigError(f"model.autoencoder.scale={ae.scale}, but {checkpoint_uri} was trained with scale "
                          f"{space.scale}: leave model.autoencoder.scale null to use it")
    return Flow(model, space, autoencoder, ae.batch_size)


def load_model(cfg: Config, checkpoint_uri: str, device: torch.device) -> UNetModel:
    """The EMA network of a checkpoint, without an autoencoder (model registration)."""
    return load_flow(cfg, checkpoint_uri, device, decoder=False).model
