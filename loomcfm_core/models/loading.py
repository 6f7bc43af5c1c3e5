"""The velocity network of a config, fresh or with a checkpoint's EMA weights, and where to run it.

Training builds the network here and evaluation, reflow pairs, sampling and model registration load it
here, so every stage means the same network by the same config.
"""

from __future__ import annotations

import torch

from loomcfm_core.checkpoint import load_ema_weights
from loomcfm_core.config import Config
from loomcfm_core.errors import CheckpointError
from loomcfm_core.models.unet import UNetModel


def default_device() -> torch.device:
    """The GPU when there is one: sampling and scoring are the work a GPU is for."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(cfg: Config) -> UNetModel:
    """A freshly initialised network for the config's data shape and ``model`` section."""
    return UNetModel.from_config(cfg.model, cfg.data.channels, cfg.data.resolution)


def load_model(cfg: Config, checkpoint_uri: str, device: torch.device) -> UNetModel:
    """The EMA network of a checkpoint (ours or the reference implementation's), ready to sample.

    Raises:
        CheckpointError: the weights do not fit the configured model (the message says to check the config).
    """
    model = build_model(cfg)
    try:
        model.load_state_dict(load_ema_weights(checkpoint_uri))
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint_uri}: weights do not fit the configured model (check "
                              f"--config/model.*): {str(exc).splitlines()[0]}") from exc
    return model.to(device).eval()
