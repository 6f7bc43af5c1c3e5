"""Reading a config: a shipped preset (``digits``, ``cifar10``, ...), a user's file, or the text a KFP
parameter / ConfigMap / MLflow artifact carries. A file may ``extends:`` a preset or another file and
override parts of it; dotted ``key=value`` overrides go on top. Every error names the dotted key (with the
close matches of a misspelt one), so a typo fails before any work starts.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import ValidationError

from loomcfm_core.config.env import expand_env
from loomcfm_core.config.schema import Config
from loomcfm_core.config.tree import deep_merge, read_yaml, schema_keys
from loomcfm_core.errors import ConfigError, did_you_mean
from loomcfm_core.reference.config import is_reference_config, translate

PRESETS_PACKAGE = "loomcfm_core.presets"
DEFAULT_PRESET = "digits"


def preset_names() -> list[str]:
    files = resources.files(PRESETS_PACKAGE).iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    """:func:`~loomcfm_core.config.tree.read_yaml`, with a reference implementation config translated into
    ours (:mod:`loomcfm_core.reference.config`, which logs the translation and the keys it could not map)."""
    tree = read_yaml(text, origin)
    return translate(tree, origin).tree if is_reference_config(tree) else tree


def config_text(ref: str | None = None) -> str:
    """What ``--config`` names, as text :func:`load_config_text` takes in any process: a preset's name as it
    is (every process ships the presets), a file's contents (the file is on this machine only); anything else
    is a :class:`ConfigError` listing the presets."""
    ref = ref or DEFAULT_PRESET
    if ref in preset_names():
        return ref
    if Path(ref).is_file():
        return Path(ref).read_text()
    raise ConfigError(f"config {ref!r} is neither a preset ({', '.join(preset_names())}) nor a file"
                      f"{did_you_mean(ref, preset_names())}")


def _load_tree(ref: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a preset name or a YAML file, resolving ``extends:`` chains."""
    if ref in seen:
        raise ConfigError(f"extends: cycle {' -> '.join(seen + (ref,))}")
    if ref in preset_names():
        text = resources.files(PRESETS_PACKAGE).joinpath(f"{ref}.yaml").read_text()
    else:
        text = config_text(ref)  # a file, or the error that lists the presets
    return _resolve_extends(_read_yaml(text, ref), ref, seen + (ref,))


def _resolve_extends(tree: dict[str, Any], origin: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise ConfigError(f"{origin}: extends: expected a preset name or file path, got {parent!r}")
    return deep_merge(_load_tree(parent, seen), tree)


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted ``key=value`` pairs (values parsed as YAML) on a config tree, rejecting unknown keys."""
    tree = json.loads(json.dumps(tree))
    known = schema_keys(Config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
        if key not in known:
            raise ConfigError(f"{key}: unknown config key{suggest_key(key)}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from exc
        if value is not None and not isinstance(value, str) and _is_text(known[key]):
            value = raw.strip()  # a hash like 00000000 or a name like 2024 stays text
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            if node.get(part) is None:  # a section absent or null (model.autoencoder) starts empty
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a section")
        node[leaf] = value
    return tree


def _is_text(annotation: Any) -> bool:
    """Whether a field holds text (``str``, ``Annotated[str, ...]``, either ``| None``)."""
    while get_origin(annotation) in (Annotated, Union, UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return annotation is str


def suggest_key(key: str) -> str:
    """Close matches of an unknown dotted key: a key of its section, else a section (then the section's keys,
    or the sections, when nothing is close)."""
    sections = list(Config.model_fields)
    section, _, leaf = key.partition(".")
    if section not in sections:
        return did_you_mean(section, sections, suffix=f".{leaf}" if leaf else "") or f"; sections: {', '.join(sections)}"
    keys = [k.partition(".")[2] for k in schema_keys(Config) if k.startswith(section + ".")]
    return did_you_mean(leaf, keys, prefix=f"{section}.") or f"; {section} has: {', '.join(keys)}"


def validate(tree: dict[str, Any], origin: str = "config") -> Config:
    try:
        return Config.model_validate(expand_env(tree))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            if not err["loc"]:  # cross-field checks name their keys in the message
                lines.append(message)
                continue
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":  # an unknown key in a file or YAML text
                lines.append(f"{key}: unknown config key{suggest_key(key)}")
                continue
            shown = "input" in err and not isinstance(err["input"], dict) and repr(err["input"]) not in message
            lines.append(f"{key}: {message}" + (f" (got {err['input']!r})" if shown else ""))
        raise ConfigError(f"{origin}: invalid config: " + "; ".join(lines)) from None


def load_config(ref: str | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve a preset name or YAML file (default: the embedded ``digits`` preset) plus overrides."""
    ref = ref or DEFAULT_PRESET
    tree = apply_overrides(_load_tree(ref), overrides or [])
    return validate(tree, ref)


def load_config_text(text: str, overrides: list[str] | None = None, origin: str = "config_yaml") -> Config:
    """Like :func:`load_config` for YAML text (a KFP parameter, a ConfigMap); a bare preset name also works."""
    stripped = text.strip()
    if stripped in preset_names():
        return load_config(stripped, overrides)
    tree = _resolve_extends(_read_yaml(text, origin), origin)
    return validate(apply_overrides(tree, overrides or []), origin)
