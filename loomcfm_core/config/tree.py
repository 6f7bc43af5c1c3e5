"""The config tree's generic parts: the section base class, YAML mappings, and the dotted keys of a schema.

:mod:`loomcfm_core.config.sections` defines the sections; this module knows nothing of their contents. Keys are read
from the schema rather than from a default instance, so an optional section that defaults to ``null``
(``model.autoencoder``) still has keys ``--set`` can name.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from loomcfm_core.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The section class of a field typed ``Section`` or ``Section | None``; None for a value field."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        sections = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return sections[0] if len(sections) == 1 else None
    return None


def schema_keys(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> annotation of every value a config of ``model`` can hold, optional sections included.

    An optional section is a key of its own as well (``model.autoencoder=null`` removes it).
    """
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        section = _section_of(field.annotation)
        if section is None or field.annotation is not section:
            out[f"{prefix}{name}"] = field.annotation
        if section is not None:
            out.update(schema_keys(section, f"{prefix}{name}."))
    return out


def read_yaml(text: str, origin: str) -> dict[str, Any]:
    """A config file's mapping of sections (empty for an empty file); anything else is a ConfigError."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from exc
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{origin}: expected a mapping of config sections, got {type(tree).__name__}")
    return tree


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
