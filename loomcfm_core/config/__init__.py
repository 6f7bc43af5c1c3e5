"""The one configuration tree every front door (CLI, KFP component, k8s Job) validates: ``sections`` (their
fields and checks), ``schema`` (the tree, its checks across sections and the questions asked of it) and
``loading`` (presets, files, ``extends:``, ``--set`` overrides)."""

from loomcfm_core.config.loading import (
    DEFAULT_PRESET,
    apply_overrides,
    config_text,
    load_config,
    load_config_text,
    preset_names,
    suggest_key,
    validate,
)
from loomcfm_core.config.schema import Config
from loomcfm_core.config.sections import DataConfig, EvalConfig, ModelConfig, RayConfig, TrackingConfig
from loomcfm_core.config.tree import flatten
from loomcfm_core.errors import ConfigError

__all__ = ["DEFAULT_PRESET", "Config", "ConfigError", "DataConfig", "EvalConfig", "ModelConfig", "RayConfig",
           "TrackingConfig", "apply_overrides", "config_text", "flatten", "load_config", "load_config_text",
           "preset_names", "suggest_key", "validate"]
