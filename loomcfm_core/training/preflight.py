"""What the driver checks before any Ray worker starts, and what a resume may change.

A Ray worker that fails on bad input is retried and its error arrives wrapped in Ray's; the same check
in the driver costs a fraction of a second and ends the command with one line. So before training starts:
the network is built on the ``meta`` device, the dataset's manifest and training shards are verified, the
starting weights (``train.init_from``) must fit, and a run that resumes must resume *the same* training
(:func:`check_resume`, following the key classes of :mod:`loomcfm_core.identity`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loomcfm_core.checkpoint import latest_checkpoint, load_checkpoint, read_sampling_weights
from loomcfm_core.config import Config, load_config_text
from loomcfm_core.data.manifest import require_manifest, verify_shards
from loomcfm_core.errors import CheckpointError, ConfigError
from loomcfm_core.identity import IDENTITY, SCHEDULE, changed_keys, describe
from loomcfm_core.models.loading import check_buildable, weights_mismatch
from loomcfm_core.training.sampler import GlobalBatchSampler
from loomcfm_core.training.step import TrainState, warmup_lambda


@dataclass
class Resume:
    """Where a run stands: its latest checkpoint (None for a fresh run), the step and MLflow run it
    continues, and the schedule changes (``{key: (old, new)}``) allowed and to be applied."""

    checkpoint_uri: str | None = None
    step: int = 0
    mlflow_run_id: str | None = None
    schedule_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def total_steps(cfg: Config, num_images: int) -> int:
    """The step a training of ``num_images`` images ends at: ``train.max_steps``, else whole epochs.

    Raises:
        UsageError: the global batch is larger than the dataset.
    """
    sampler = GlobalBatchSampler(num_images, cfg.train.batch_size, 0, cfg.ray.num_workers, cfg.train.seed)
    return cfg.train.max_steps or cfg.train.epochs * sampler.steps_per_epoch


def check_inputs(cfg: Config, dataset_uri: str) -> int:
    """The checks that need no run folder: the network, the dataset, the batch, the starting weights.

    Returns:
        The step the training ends at (:func:`total_steps`).
    """
    check_buildable(cfg)
    manifest = require_manifest(dataset_uri)
    verify_shards(dataset_uri, manifest, cfg.data.local_cache, splits=("train",))
    target = total_steps(cfg, manifest["splits"]["train"]["count"])
    if cfg.train.init_from:
        weights = read_sampling_weights(cfg.train.init_from)
        why = weights_mismatch(cfg, weights.backbone, weights.config_yaml)
        if why:
            raise CheckpointError(f"train.init_from={cfg.train.init_from}: the weights do not fit the configured "
                                  f"model: {why}")
    return target


def check_resume(ckpt: dict, uri: str, cfg: Config, dataset_uri: str) -> dict[str, tuple[Any, Any]]:
    """The schedule changes to apply when ``cfg`` continues the checkpoint ``ckpt`` (read from ``uri``).

    Raises:
        CheckpointError: an identity key (or the dataset) differs: this would be another training; or a
            schedule key differs and ``train.allow_changes`` does not name it (both refusals of the run's
            checkpoint, exit 1 alike).
    """
    try:
        saved = load_config_text(ckpt["config_yaml"]).flat() if ckpt.get("config_yaml") else {}
    except ConfigError as exc:
        raise CheckpointError(f"{uri}: its config cannot be read by this version ({exc})") from exc
    changes = changed_keys(saved, cfg.flat())
    identity = dict(changes.get(IDENTITY, {}))
    if ckpt.get("dataset_uri") and ckpt["dataset_uri"] != dataset_uri:
        identity["dataset"] = (ckpt["dataset_uri"], dataset_uri)
    if identity:
        raise CheckpointError(f"{uri}: this run was trained with other {describe(identity)} (checkpoint -> now); "
                              "these define the model and the data order and cannot change on resume: train in "
                              "another run folder (another train.run_name, or none for the default name)")
    schedule = changes.get(SCHEDULE, {})
    refused = {key: change for key, change in schedule.items() if key not in cfg.train.allow_changes}
    if refused:
        flags = " ".join(f"--allow-change {key}" for key in sorted(refused))
        raise CheckpointError(f"train: {describe(refused)} differ from the run's latest checkpoint {uri} "
                          f"(checkpoint -> now); to change the schedule on resume, allow it: {flags} "
                          f"(train.allow_changes)")
    return schedule


def plan_resume(cfg: Config, dataset_uri: str, run_uri: str) -> Resume:
    """Read the run's latest checkpoint (if any) and check that ``cfg`` may continue it."""
    uri = latest_checkpoint(run_uri)
    if uri is None:
        return Resume()
    ckpt = load_checkpoint(uri, map_location="cpu")
    return Resume(uri, ckpt["step"], ckpt.get("mlflow_run_id"), check_resume(ckpt, uri, cfg, dataset_uri))


def apply_schedule(state: TrainState) -> None:
    """Make a restored optimizer follow the current config's schedule: the optimizer's and scheduler's state
    dicts bring back the checkpoint's LR, betas and weight decay, which would otherwise win. With an unchanged
    schedule this changes nothing. The warm-up function, the clipping and the EMA decay come from the current
    config already (:func:`~loomcfm_core.training.step.build_state`, every step)."""
    train = state.cfg.train
    state.scheduler.base_lrs = [train.lr for _ in state.optimizer.param_groups]
    factor = warmup_lambda(train.warmup_steps)(state.scheduler.last_epoch)
    for group in state.optimizer.param_groups:
        group.update(initial_lr=train.lr, lr=train.lr * factor, betas=tuple(train.betas),
                     weight_decay=train.weight_decay)
