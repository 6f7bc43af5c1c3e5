"""The config's sections: their fields, ranges and allowed values, and the checks within a section.

Allowed values are defined once, in leaf modules that import nothing of the config: the fixed sets in
:mod:`loomcfm_core.choices`, the URI forms in :mod:`loomcfm_core.storage`, the schedule keys in
:mod:`loomcfm_core.identity`; the ``kube`` section is :mod:`loomcfm_core.kube.settings`. A section only checks
against them. The tree of sections is :mod:`loomcfm_core.config.schema`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_serializer, model_validator

from loomcfm_core.choices import (ABLATION_ARMS, ASSIGNMENT_SOLVERS, AUTOENCODERS, COSTS, COUPLINGS, FEATURE_NETWORKS,
                                  TARGET_DTYPES, check_method, check_source, check_tracking_uri, source_forms)
from loomcfm_core.config.tree import Section as _Section
from loomcfm_core.errors import did_you_mean
from loomcfm_core.identity import SCHEDULE_KEYS
from loomcfm_core.storage import check_uri

# Locations: any storage URI, or only a node-local folder (checked by :func:`loomcfm_core.storage.check_uri`).
Uri = Annotated[str, AfterValidator(check_uri)]
LocalDir = Annotated[str, AfterValidator(lambda value: check_uri(value, local=True))]


class DataConfig(_Section):
    name: str = Field("digits", pattern=r"^[A-Za-z0-9_.-]+$", description="dataset name, used in the cache URI")
    source: Annotated[str, AfterValidator(check_source)] = Field("builtin:digits",
                                                                 description=" | ".join(source_forms()))
    channels: Literal[1, 3, 4] = 1
    resolution: int = Field(8, ge=4, le=1024, description="images are H=W=resolution")
    resize: bool = Field(False, description="imagefolder: resize images to resolution instead of rejecting "
                         "other sizes")
    convert: bool = Field(False, description="imagefolder: convert images of another colour mode to "
                          "data.channels (RGB to grey by luminance, grey to RGB by copying) instead of rejecting "
                          "them; every conversion is logged")
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


class AutoencoderConfig(_Section):
    """The pretrained autoencoder whose latent space the flow is trained in (``models/autoencoder.py``)."""

    kind: Literal[AUTOENCODERS] = Field(description="kl: a KL (Gaussian posterior) autoencoder; vq: a "
                                             "vector-quantised one")
    weights: Uri = Field(description="path/URI: a diffusers folder (config.json + diffusion_pytorch_model."
                         "safetensors), a latent-diffusion / Stable Diffusion single file, or a reference "
                         "LOOM-CFM checkpoint holding ae.*; never downloaded")
    config: Uri | None = Field(None, description="a single file's diffusers config.json (or a folder holding "
                               "it); null: derived from the weights' shapes")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{8,64}$", description="expected sha256 of the weights "
                               "file (or a prefix); default: the .sha256 file beside it")
    scale: float | None = Field(None, gt=0.0, description="the flow sees latents / scale; null: the weights' own "
                                "(a reference checkpoint's ae.scale), else computed by `cache`")
    latent_channels: int = Field(4, ge=1, description="channels of a latent (checked against the weights)")
    downsample: int = Field(8, ge=1, description="image side / latent side, a power of 2 (checked against the "
                            "weights)")
    batch_size: int = Field(32, ge=1, description="images per encode or decode batch")

    @field_validator("downsample")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("must be a power of 2 (8 for f8, 16 for f16)")
        return value


class ModelConfig(_Section):
    channels: int = Field(32, ge=32, multiple_of=32, description="base width (GroupNorm uses 32 groups)")
    channel_mult: list[int] = Field([1, 2], min_length=1)
    num_res_blocks: int = Field(1, ge=1)
    attn_resolutions: list[int] = Field([4], description="feature-map sizes that get self-attention")
    num_head_channels: int = Field(64, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    autoencoder: AutoencoderConfig | None = Field(None, description="train in this autoencoder's latent space")

    @model_serializer(mode="wrap")
    def _without_absent_autoencoder(self, handler) -> dict[str, Any]:
        """A pixel-space model dumps as it did before latents existed, so its hashes (run names, cache and
        pairs keys) stay the same."""
        dumped = handler(self)
        if dumped.get("autoencoder", 0) is None:
            del dumped["autoencoder"]
        return dumped

    @field_validator("channel_mult")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(m < 1 for m in value):
            raise ValueError(f"every multiplier must be >= 1, got {value}")
        return value


class CouplingConfig(_Section):
    kind: Literal[COUPLINGS] = "loom"
    num_seeds: int = Field(4, ge=1, description="K: noise seeds owned by every data point")
    cost: Literal[COSTS] = "l2"
    max_problem: int = Field(1024, ge=1, description="most items in one assignment problem: a larger global "
                             "batch is solved per rank, a smaller one together with the next batches that fit")
    solver: Literal[ASSIGNMENT_SOLVERS] = Field("lapjv", description="exact assignment solver")
    pipelined: bool = Field(True, description="solve the next batch's assignment on a host thread while this "
                            "batch trains (same result as without)")
    converge_epochs: int = Field(0, ge=0, description="loom: passes of reassignment over the data with no "
                                 "network before training (the paper's 'train after convergence'; the "
                                 "reference's training.train_after)")

    @model_validator(mode="after")
    def _converge_needs_loom(self) -> CouplingConfig:
        if self.converge_epochs and self.kind != "loom":
            raise ValueError(f"coupling.converge_epochs={self.converge_epochs} needs coupling.kind=loom (the only "
                             f"kind that keeps its reassignments), got {self.kind!r}")
        return self


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
                                 "<storage.root>/runs/; default: <name>-<hash of the identity keys and the dataset> "
                                 "(layout.py, identity.py). A rerun with the same name resumes from its latest "
                                 "checkpoint")
    allow_changes: list[str] = Field([], description="schedule keys (train.lr, train.warmup_steps, ...) that "
                                     "may differ from the checkpoint's on resume; the new values are applied "
                                     "and recorded on the MLflow run")
    lease_seconds: float = Field(60.0, ge=2.0, description="the run folder's lease expires this long after its "
                                 "holder's last heartbeat (every third of it); then another training takes over")

    @field_validator("allow_changes")
    @classmethod
    def _schedule_keys(cls, value: list[str]) -> list[str]:
        unknown = [key for key in value if key not in SCHEDULE_KEYS]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a schedule key{did_you_mean(unknown[0], list(SCHEDULE_KEYS))}; "
                             f"the keys that may change on resume are {', '.join(SCHEDULE_KEYS)}")
        return value

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"both betas must be in [0, 1), got {list(value)}")
        return value


# A sampling method string, ``<solver>-<steps>`` (:func:`loomcfm_core.choices.parse_method`).
Method = Annotated[str, AfterValidator(check_method)]


class SampleConfig(_Section):
    method: Method = Field("euler-4", description="<solver>-<steps>, e.g. euler-4 or dopri5-1")
    num_images: int = Field(64, ge=1)
    batch_size: int = Field(256, ge=1)
    nrows: int = Field(8, ge=1)
    max_request_images: int = Field(1024, ge=1, description="the most images one request to the served generator "
                                    "(mlflow models serve) may ask for; more are refused with 400, not left to "
                                    "fail allocating memory")


class DuringTrainingConfig(_Section):
    """The cheap evaluation a training runs every ``eval.every_steps`` (its EMA model, on the training run)."""

    method: Method = Field("euler-2", description="<solver>-<steps>, a cheap one: its distance is the training "
                           "run's during_training/<metric>/<method> (step = training step), with a sample grid")
    num_samples: int = Field(1000, ge=2, description="samples per evaluation, shared among the training's workers")


class EvalConfig(_Section):
    every_steps: int = Field(0, ge=0, description="score the EMA model during training every this many steps "
                             "(and at the last), with eval.during_training; 0: never")
    during_training: DuringTrainingConfig = DuringTrainingConfig()
    methods: list[Method] = Field(["euler-1", "euler-2", "euler-4", "euler-8", "dopri5-1"], min_length=1)
    num_samples: int = Field(2000, ge=2)
    batch_size: int = Field(500, ge=1)
    feature_network: Literal[FEATURE_NETWORKS] = Field(
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
    target_dtype: Literal[TARGET_DTYPES] = Field("uint8", description="how generated targets are stored: uint8 "
                                                 "(clamped to [-1, 1], rounded, like cached images; the reference "
                                                 "truncates) or float32 (as generated, 4x the size)")


class AblationConfig(_Section):
    arms: list[Literal[ABLATION_ARMS]] = Field(list(ABLATION_ARMS), min_length=1, description="the couplings the "
                                               "ablation pipeline trains and compares, one training each")

    @field_validator("arms")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each arm at most once, got {value}")
        return value


class StorageConfig(_Section):
    root: Uri = Field("loomcfm-data", description="local path, file:// or s3://bucket/prefix")


class TrackingConfig(_Section):
    uri: Annotated[str | None, AfterValidator(check_tracking_uri)] = Field(
        None, description="MLflow tracking URI (http(s)://host:port, sqlite:///path, postgresql://...); default: "
        "SQLite under local_dir")
    local_dir: LocalDir = Field("loomcfm-runs", description="folder of the default local MLflow store")
    experiment: str | None = Field(None, description="default: loomcfm-<config name>")
    system_metrics_seconds: float = Field(10.0, ge=0.0, description="MLflow system metrics (CPU, memory, disk, "
                                          "network, GPU with nvidia-ml-py) on training, pairs and evaluation runs, "
                                          "sampled this often; 0: off")


class RayConfig(_Section):
    address: str | None = Field(None, description="None: start a local Ray; 'auto' inside a cluster")
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    max_failures: int = Field(2, ge=0, description="worker-group restarts Ray Train attempts; each resumes "
                              "from the latest checkpoint")
