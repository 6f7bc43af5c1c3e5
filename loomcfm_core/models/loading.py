"""The velocity network of a config, fresh or with a checkpoint's EMA weights, and where to run it.

Training builds the network here and evaluation, reflow pairs, sampling and model registration load it
here, so every stage means the same network by the same config.
"""

from __future__ import annotations

import torch

from loomcfm_core.checkpoint import read_ema_weights
from loomcfm_core.config import Config, load_config_text
from loomcfm_core.errors import CheckpointError, ConfigError, UsageError
from loomcfm_core.identity import changed_keys, describe
from loomcfm_core.models.unet import UNetModel

SHAPE_KEYS = ("data.channels", "data.resolution")  # besides model.*: what the weights' shapes depend on
SHOWN = 3  # examples of each kind of mismatch in a message


def default_device() -> torch.device:
    """The GPU when there is one: sampling and scoring are the work a GPU is for."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(cfg: Config) -> UNetModel:
    """A freshly initialised network for the config's data shape and ``model`` section.

    Raises:
        ConfigError: ``model.*`` describes no network (e.g. heads that do not divide a width).
    """
    try:
        return UNetModel.from_config(cfg.model, cfg.data.channels, cfg.data.resolution)
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
    """Why ``weights`` do not fit the config's network (None when they do): the config keys that differ
    from the checkpoint's own config (ours carry it), else the missing, unexpected and reshaped tensors."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in build_model(cfg).state_dict().items()}
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k])}" for k in expected
                if k in weights and weights[k].shape != expected[k]]
    if not (missing or unexpected or reshaped):
        return None
    keys = {k: v for changes in changed_keys(_saved_flat(config_yaml), cfg.flat()).values()
            for k, v in changes.items() if k.startswith("model.") or k in SHAPE_KEYS}
    if keys:
        return f"it was trained with other {describe(keys)} (checkpoint -> config)"
    parts = [f"{len(found)} {what}, e.g. {', '.join(found[:SHOWN])}" for what, found in
             (("tensors of another shape (checkpoint vs config)", reshaped), ("missing", missing),
              ("unexpected", unexpected)) if found]
    return "; ".join(parts)


def fitting_weights(cfg: Config, checkpoint_uri: str) -> dict[str, torch.Tensor]:
    """The EMA weights of a checkpoint (ours or the reference implementation's), checked against the
    configured network; a stage calls this before any other work, so a wrong checkpoint fails first.

    Raises:
        CheckpointError: no checkpoint there, not a checkpoint, or weights that do not fit the configured
            model (the message names the differing config keys or tensors).
    """
    weights, config_yaml = read_ema_weights(checkpoint_uri)
    why = weights_mismatch(cfg, weights, config_yaml)
    if why:
        raise CheckpointError(f"{checkpoint_uri}: the weights do not fit the configured model (--config / "
                              f"--set model.*): {why}")
    return weights


def load_model(cfg: Config, checkpoint_uri: str, device: torch.device) -> UNetModel:
    """The EMA network of a checkpoint, ready to sample (:func:`fitting_weights` says what it raises)."""
    model = build_model(cfg)
    model.load_state_dict(fitting_weights(cfg, checkpoint_uri))
    return model.to(device).eval()
