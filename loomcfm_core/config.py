"""The one configuration tree every front door (CLI, KFP component, k8s Job) validates.

A config is YAML text: a shipped preset (``digits``, ``cifar10``, ...), a user's file, or the text a KFP
parameter / ConfigMap / MLflow artifact carries. A file may ``extends:`` a preset or another file and
override parts of it; dotted ``key=value`` overrides go on top. Every error names the dotted key, so a
typo in ``--set`` fails before any work starts.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The allowed values are defined by the modules that implement them; the config only checks against them.
from loomcfm_core.coupling import COSTS, KINDS
from loomcfm_core.data.sources import check_source, source_forms
from loomcfm_core.errors import ConfigError
from loomcfm_core.sampling import check_method
from loomcfm_core.storage import check_uri

PRESETS_PACKAGE = "loomcfm_core.presets"
DEFAULT_PRESET = "digits"


# Locations: any storage URI, or only a node-local folder (checked by :func:`loomcfm_core.storage.check_uri`).
Uri = Annotated[str, AfterValidator(check_uri)]
LocalDir = Annotated[str, AfterValidator(lambda value: check_uri(value, local=True))]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    name: str = Field("digits", pattern=r"^[A-Za-z0-9_.-]+$", description="dataset name, used in the cache URI")
    source: Annotated[str, AfterValidator(check_source)] = Field("builtin:digits",
                                                                 description=" | ".join(source_forms()))
    channels: Literal[1, 3, 4] = 1
    resolution: int = Field(8, ge=4, le=1024, description="images are H=W=resolution")
    resize: bool = Field(False, description="imagefolder: resize images to resolution instead of rejecting "
                         "other sizes")
    hflip: bool = Field(False, description="a horizontally flipped image is its own data point (index i + N)")
    shard_size: int = Field(100_000, ge=1, description="images per HDF5 shard")
    uri: Uri | None = Field(None, description="use this cached dataset URI instead of the one derived from "
                            "the source (e.g. reflow pairs)")
    local_cache: LocalDir = Field("~/.cache/loomcfm", description="node-local folder for copies of remote shards")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.channels, self.resolution, self.resolution)


class ModelConfig(_Section):
    channels: int = Field(32, ge=32, multiple_of=32, description="base width (GroupNorm uses 32 groups)")
    channel_mult: list[int] = Field([1, 2], min_length=1)
    num_res_blocks: int = Field(1, ge=1)
    attn_resolutions: list[int] = Field([4], description="feature-map sizes that get self-attention")
    num_head_channels: int = Field(64, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @field_validator("channel_mult")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(m < 1 for m in value):
            raise ValueError(f"every multiplier must be >= 1, got {value}")
        return value


class CouplingConfig(_Section):
    kind: Literal[KINDS] = "loom"
    num_seeds: int = Field(4, ge=1, description="K: noise seeds owned by every data point")
    cost: Literal[COSTS] = "l2"


class TrainConfig(_Section):
    batch_size: int = Field(128, ge=1, description="per worker")
    lr: float = Field(2e-4, gt=0.0)
    warmup_steps: int = Field(100, ge=0)
    epochs: int = Field(20, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (overrides epochs)")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0)
    sigma: float = Field(0.0, ge=0.0, description="std of the Gaussian around the straight path")
    bf16: bool = Field(False, description="bf16 autocast (GPU only)")
    seed: int = Field(0, ge=0)
    log_every: int = Field(20, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    init_from: Uri | None = Field(None, description="checkpoint URI whose EMA weights initialise the model")
    run_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="folder under "
                                 "<storage.root>/runs/; default: <name>-<hash of data, model, coupling, train>. "
                                 "A rerun with the same name resumes from its latest checkpoint")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"both betas must be in [0, 1), got {list(value)}")
        return value


# A sampling method string, ``<solver>-<steps>`` with a solver :mod:`loomcfm_core.sampling` implements.
Method = Annotated[str, AfterValidator(check_method)]


class SampleConfig(_Section):
    method: Method = Field("euler-4", description="<solver>-<steps>, e.g. euler-4 or dopri5-1")
    num_images: int = Field(64, ge=1)
    batch_size: int = Field(256, ge=1)
    nrows: int = Field(8, ge=1)


class EvalConfig(_Section):
    methods: list[Method] = Field(["euler-1", "euler-2", "euler-4", "euler-8", "dopri5-1"], min_length=1)
    num_samples: int = Field(2000, ge=2)
    batch_size: int = Field(500, ge=1)
    feature_network: Literal["auto", "inception", "classifier"] = Field(
        "auto", description="auto: the stored classifier for builtin:digits (fd_<name>), Inception (FID) otherwise")
    inception_weights: Uri | None = Field(None, description="path/URI of the TF-Inception 2015-12-05 weights "
                                          "(torch-fidelity format)")
    inception_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{8,64}$", description="expected sha256 "
                                         "(or a prefix); default: the .sha256 file beside the weights")


class ReflowConfig(_Section):
    method: Method = Field("dopri5-1", description="the solver that generates the pairs, <solver>-<steps>")
    num_pairs: int = Field(5000, ge=1)
    batch_size: int = Field(256, ge=1, description="training batch per worker for the reflow stage")
    lr: float = Field(2e-5, gt=0.0)
    warmup_steps: int = Field(100, ge=0)
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop reflow training after this many steps")


class StorageConfig(_Section):
    root: Uri = Field("loomcfm-data", description="local path, file:// or s3://bucket/prefix")


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default: SQLite under local_dir")
    local_dir: LocalDir = Field("loomcfm-runs", description="folder of the default local MLflow store")
    experiment: str | None = Field(None, description="default: loomcfm-<config name>")


class RayConfig(_Section):
    address: str | None = Field(None, description="None: start a local Ray; 'auto' inside a cluster")
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    max_failures: int = Field(2, ge=0, description="worker-group restarts Ray Train attempts; each resumes "
                              "from the latest checkpoint")


class Config(_Section):
    name: str = Field("digits", pattern=r"^[A-Za-z0-9_.-]+$")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    coupling: CouplingConfig = CouplingConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    reflow: ReflowConfig = ReflowConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _model_fits_data(self) -> Config:
        downsamplings = len(self.model.channel_mult) - 1
        if self.data.resolution % (2**downsamplings):
            raise ValueError(f"model.channel_mult has {downsamplings} downsamplings, which needs data.resolution "
                             f"divisible by {2**downsamplings}, got {self.data.resolution}")
        sizes = [self.data.resolution // 2**level for level in range(downsamplings + 1)]
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

    def digest(self, *sections: str) -> str:
        """A short stable hash of the whole config or of the named sections."""
        dumped = self.model_dump(mode="json")
        chosen = {s: dumped[s] for s in sections} if sections else dumped
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:12]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def preset_names() -> list[str]:
    files = resources.files(PRESETS_PACKAGE).iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from exc
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{origin}: expected a mapping of config sections, got {type(tree).__name__}")
    return tree


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


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted ``key=value`` pairs (values parsed as YAML) on a config tree, rejecting unknown keys."""
    tree = json.loads(json.dumps(tree))
    known = Config().flat()
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
        if value is not None and not isinstance(value, str) and _is_text_field(key):
            value = raw.strip()  # a hash like 00000000 or a name like 2024 stays text
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a section")
        node[leaf] = value
    return tree


def _is_text_field(key: str) -> bool:
    model: type[BaseModel] = Config
    *sections, leaf = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    annotation = model.model_fields[leaf].annotation
    while get_origin(annotation) in (Annotated, Union, UnionType):  # Annotated[str, ...] | None
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return annotation is str


def did_you_mean(word: str, candidates: list[str] | dict[str, Any]) -> str:
    """``; did you mean X?`` for the close matches of a misspelt name among ``candidates`` (empty if none):
    the one suggestion every unknown name gets (a ``--set`` key, a key in a config file, a preset)."""
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def suggest_key(key: str) -> str:
    """A close dotted config key, else the section's keys, else the sections."""
    known = Config().flat()
    close = did_you_mean(key, known)
    if close:
        return close
    section = key.split(".")[0] + "."
    siblings = sorted(k for k in known if k.startswith(section))
    return f"; {section[:-1]} has: {', '.join(siblings)}" if siblings else f"; sections: {', '.join(Config.model_fields)}"


def validate(tree: dict[str, Any], origin: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
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
