"""What makes a training run the run it is: every config key in one of four classes, in one table.

- ``identity``: what defines the model and the order the data is visited in (the network, the coupling, the
  batch size and world size, the seed, flips, the objective, the starting weights). Their digest names the
  default run folder (:func:`loomcfm_core.layout.default_run_name`), and resuming a checkpoint with another
  value is refused, listing the keys.
- ``dataset``: the keys that decide which cached dataset is trained on. They are identity too, but through
  the dataset URI the cache derives from them (so ``./x`` and ``/abs/x`` are one source), not by value.
- ``schedule``: the optimisation schedule (LR, warm-up, Adam's betas, weight decay, clipping, EMA decay).
  A resume with another value is refused unless ``train.allow_changes`` names the key; then the new value
  is applied to the restored optimizer and recorded on the MLflow run.
- ``free``: how long, how often and where (``train.max_steps``, ``train.epochs``, ``train.log_every``,
  ``train.checkpoint_every``, ``data.num_workers``, paths, tracking, evaluation and reflow settings). They
  never change the run folder and change freely on resume: "train longer" is a rerun with a larger
  ``train.max_steps``.

A new config key gets its class here (a test fails until it has one); nothing else decides.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from loomcfm_core.storage import absolute

IDENTITY, DATASET, SCHEDULE, FREE = "identity", "dataset", "schedule", "free"

# Exact dotted keys first, then ``section.*`` for the rest of a section.
KEY_CLASSES: dict[str, str] = {
    "name": IDENTITY,
    "data.hflip": IDENTITY,
    "data.local_cache": FREE, "data.num_workers": FREE,
    "data.*": DATASET,
    "model.autoencoder.batch_size": FREE,  # images per encode/decode batch: the same latents either way
    "model.*": IDENTITY,
    "coupling.pipelined": FREE,  # a host thread solves the next batch ahead: the same result either way
    "coupling.*": IDENTITY,      # kind, K, cost, problem size and solver (solvers break ties differently)
    "train.batch_size": IDENTITY, "train.seed": IDENTITY, "train.sigma": IDENTITY, "train.init_from": IDENTITY,
    "train.lr": SCHEDULE, "train.warmup_steps": SCHEDULE, "train.betas": SCHEDULE, "train.weight_decay": SCHEDULE,
    "train.grad_clip": SCHEDULE, "train.ema_decay": SCHEDULE,
    "train.*": FREE,
    "ray.num_workers": IDENTITY,
    "ray.*": FREE,
    "sample.*": FREE, "eval.*": FREE, "reflow.*": FREE, "ablation.*": FREE, "storage.*": FREE,
    "tracking.*": FREE,
    "kube.*": FREE,  # where a RayJob runs; the training's shape is ray.*, which cluster_config derives from it
}
SCHEDULE_KEYS = tuple(key for key, kind in KEY_CLASSES.items() if kind == SCHEDULE)
URI_KEYS = ("train.init_from", "model.autoencoder.weights", "model.autoencoder.config")  # compared as absolute URIs: a relative path names the same file


def key_class(key: str) -> str:
    """The class of a dotted config key (a ``KeyError`` for a key the table does not cover)."""
    if key in KEY_CLASSES:
        return KEY_CLASSES[key]
    return KEY_CLASSES[key.split(".")[0] + ".*"]


def _canonical(key: str, value: Any) -> Any:
    return absolute(value) if key in URI_KEYS and value else value


def identity_values(flat: dict[str, Any]) -> dict[str, Any]:
    """The identity keys of a flattened config, URIs made absolute."""
    return {key: _canonical(key, value) for key, value in flat.items() if key_class(key) == IDENTITY}


def identity_digest(flat: dict[str, Any], dataset_uri: str) -> str:
    """A short hash of a flattened config's identity keys and the dataset URI: the same for a rerun of the same
    training, whatever the free keys say (``train.max_steps``, ``train.log_every``, ``data.num_workers`` ...)."""
    text = json.dumps({"identity": identity_values(flat), "dataset": dataset_uri}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, tuple[Any, Any]]]:
    """Keys whose values differ between two flattened configs, by class: ``{class: {key: (old, new)}}``.

    A key only one side has (a config written before the key existed) counts as unchanged.
    """
    out: dict[str, dict[str, tuple[Any, Any]]] = {}
    for key in old.keys() & new.keys():
        before, after = _canonical(key, old[key]), _canonical(key, new[key])
        if before != after:
            out.setdefault(key_class(key), {})[key] = (before, after)
    return out


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    """``key (old -> new), ...`` in key order, for error messages and MLflow tags."""
    return ", ".join(f"{key} ({json.dumps(old)} -> {json.dumps(new)})" for key, (old, new) in sorted(changes.items()))
