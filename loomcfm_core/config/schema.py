"""The config tree: the sections of :mod:`loomcfm_core.config.sections` under one root, the checks across
sections, and one property for each question the rest of the code asks of a whole config
(:attr:`Config.is_reflow`, :attr:`Config.experiment`, ...), so that no module spells the answer again.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import Field, model_validator

from loomcfm_core.config.sections import (AblationConfig, CouplingConfig, DataConfig, EvalConfig, ModelConfig,
                                          RayConfig, ReflowConfig, SampleConfig, StorageConfig, TrackingConfig, TrainConfig)
from loomcfm_core.config.tree import Section as _Section
from loomcfm_core.config.tree import flatten
from loomcfm_core.kube.settings import KubeConfig


class Config(_Section):
    name: str = Field("digits", pattern=r"^[A-Za-z0-9_.-]+$")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    coupling: CouplingConfig = CouplingConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    reflow: ReflowConfig = ReflowConfig()
    ablation: AblationConfig = AblationConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    kube: KubeConfig = KubeConfig()

    @property
    def flow_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the flow model sees: an image, or its latent under ``model.autoencoder``."""
        autoencoder = self.model.autoencoder
        if autoencoder is None:
            return self.data.shape
        side = self.data.resolution // autoencoder.downsample
        return (autoencoder.latent_channels, side, side)

    @property
    def is_latent(self) -> bool:
        """Whether the flow lives in an autoencoder's latent space (``model.autoencoder``)."""
        return self.model.autoencoder is not None

    @property
    def is_reflow(self) -> bool:
        """Whether this trains on reflow pairs (``coupling.kind: pairs``): its model registers as ``reflow``."""
        return self.coupling.kind == "pairs"

    @property
    def experiment(self) -> str:
        """The MLflow experiment of this config's runs: ``tracking.experiment``, else one per config name
        (``loomcfm-<name>``), so runs of one config compare side by side and different configs do not mix."""
        return self.tracking.experiment or f"loomcfm-{self.name}"

    @property
    def registered_model(self) -> str:
        """The name its trained models register under (``loomcfm-<name>``; aliases ``base`` and ``reflow``)."""
        return f"loomcfm-{self.name}"

    @property
    def feature_network(self) -> str:
        """The network evaluation scores with (``eval.feature_network`` with ``auto`` decided): the classifier
        stored with the built-in digits (no Inception weights at hand, and 8x8 digits are far from what
        Inception saw), Inception otherwise."""
        if self.eval.feature_network == "auto":
            return "classifier" if self.data.source == "builtin:digits" else "inception"
        return self.eval.feature_network

    @property
    def pair_target_dtype(self) -> str:
        """How reflow pair targets are stored: ``reflow.target_dtype`` for pixels; a latent model's targets are
        latents, not pixels, and stay float32."""
        return "float32" if self.is_latent else self.reflow.target_dtype

    @model_validator(mode="after")
    def _model_fits_data(self) -> Config:
        autoencoder = self.model.autoencoder
        if autoencoder is not None and self.data.resolution % autoencoder.downsample:
            raise ValueError(f"data.resolution={self.data.resolution} is not divisible by "
                             f"model.autoencoder.downsample={autoencoder.downsample}")
        resolution, what = self.flow_shape[-1], "data.resolution" if autoencoder is None else "the latent side"
        downsamplings = len(self.model.channel_mult) - 1
        if resolution % (2**downsamplings):
            raise ValueError(f"model.channel_mult has {downsamplings} downsamplings, which needs {what} "
                             f"divisible by {2**downsamplings}, got {resolution}")
        sizes = [resolution // 2**level for level in range(downsamplings + 1)]
        unreachable = [r for r in self.model.attn_resolutions if r not in sizes]
        if unreachable:
            raise ValueError(f"model.attn_resolutions {unreachable} are not feature-map sizes of this network "
                             f"({sizes}); they are sizes, not the downsampling rates of ADM configs")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, the form MLflow params and ``--set`` use."""
        return flatten(self.model_dump(mode="json"))
