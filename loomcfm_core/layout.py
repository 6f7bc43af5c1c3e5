"""Where everything a pipeline writes lives: the one module that builds the URI of a dataset, reflow pairs, a
training run, a checkpoint and an evaluation. Everything else asks here.

::

    <storage.root>/datasets/<data.name>-<key>/             a cached image dataset (key: data.cache.cache_key)
    <storage.root>/datasets/<data.name>-latents-<key>/     its latent cache (key: data.latents.latents_key)
    <storage.root>/datasets/<data.name>-pairs-<key>/       reflow pairs (key: :func:`pairs_key`)
    <storage.root>/runs/<run>/                             a training run (train.run_name, else default_run_name)
        checkpoints/step-00001000.pt                       its checkpoints
        converge.pt                                        LOOM's convergence before training, so far
        set-aside/step-00002000.pt                         checkpoints ``--resume-step`` moved out of the way
        eval/<checkpoint>/<metric>-n<samples>-<hash>/      an evaluation of one of its checkpoints
    <storage.root>/eval/<checkpoint>/<metric>-n<samples>-<hash>/   an evaluation of a checkpoint from elsewhere
    <storage.root>/holders/<mlflow run id>.json            which process holds an open MLflow run (run_status.py)

Every location is absolute (a local root is resolved), so it means the same to every process of a run.
"""

from __future__ import annotations

import hashlib
import json
import re

from loomcfm_core.config import Config
from loomcfm_core.identity import identity_digest
from loomcfm_core.storage import absolute, join

CHECKPOINTS, SET_ASIDE, EVAL = "checkpoints", "set-aside", "eval"
_CHECKPOINT = re.compile(r"step-(\d+)\.pt$")
# The config's locations: a Ray worker or a RayJob runs in another working directory.
LOCATIONS = ("storage.root", "tracking.local_dir", "data.uri", "train.init_from", "eval.inception_weights")


def _digest(identity: dict, length: int) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:length]


def root(cfg: Config) -> str:
    """``storage.root``, absolute."""
    return absolute(cfg.storage.root)


# ---- datasets ---------------------------------------------------------------------------------------------

def dataset_uri(cfg: Config, key: str) -> str:
    """A cached image dataset, content-addressed by ``key`` (what decides its shards' bytes)."""
    return join(root(cfg), "datasets", f"{cfg.data.name}-{key}")


def latents_uri(cfg: Config, key: str) -> str:
    """The latent cache of an image dataset, content-addressed by ``key``."""
    return join(root(cfg), "datasets", f"{cfg.data.name}-latents-{key}")


def pairs_key(cfg: Config, checkpoint_uri: str) -> str:
    """What decides a reflow pairs dataset: the checkpoint, the method and count, the network, the shards and
    how targets are stored (nothing else: another evaluation setting or LR finds the same pairs)."""
    return _digest({"checkpoint": checkpoint_uri, "method": cfg.reflow.method, "num_pairs": cfg.reflow.num_pairs,
                    "model": cfg.model.model_dump(mode="json"), "shard_size": cfg.data.shard_size,
                    "target_dtype": cfg.reflow.target_dtype}, 12)


def pairs_uri(cfg: Config, checkpoint_uri: str) -> str:
    """The reflow pairs a checkpoint generates with this config (:func:`pairs_key`)."""
    return join(root(cfg), "datasets", f"{cfg.data.name}-pairs-{pairs_key(cfg, checkpoint_uri)}")


# ---- runs and checkpoints ---------------------------------------------------------------------------------

def default_run_name(cfg: Config, dataset_uri: str) -> str:
    """``<name>-<digest of the identity keys and the dataset>`` (:mod:`loomcfm_core.identity`), or
    ``<name>-reflow-<digest>`` for a training on reflow pairs (beside its base run, a person tells them apart):
    a rerun of the same training finds its folder again, whatever the free keys say."""
    return f"{cfg.name}-{'reflow-' if cfg.is_reflow else ''}{identity_digest(cfg.flat(), dataset_uri)}"


def run_uri(cfg: Config, dataset_uri: str) -> str:
    """The run folder of a training: a rerun finds its checkpoints there and resumes."""
    return join(root(cfg), "runs", cfg.train.run_name or default_run_name(cfg, dataset_uri))


def checkpoint_dir(run: str) -> str:
    return join(run, CHECKPOINTS)


def checkpoint_uri(run: str, step: int) -> str:
    """Step ``step``'s checkpoint of a run: ``step-<8 digits>.pt``, so that names sort by step."""
    return join(checkpoint_dir(run), f"step-{step:08d}.pt")


def checkpoint_step(uri: str) -> int | None:
    """The step of a checkpoint URI (None for anything else under a run's checkpoints folder)."""
    match = _CHECKPOINT.search(uri)
    return int(match.group(1)) if match else None


def convergence_uri(run: str) -> str:
    """The checkpoint of ``coupling.converge_epochs``' reassignment passes so far (the table, the costs)."""
    return join(run, "converge.pt")


def set_aside_uri(run: str, checkpoint: str) -> str:
    """Where ``--resume-step`` moves a checkpoint later than the step resumed from."""
    return join(run, SET_ASIDE, checkpoint.rsplit("/", 1)[-1])


def holders_uri(cfg: Config) -> str:
    """The folder of the records that say which process holds each open MLflow stage run, with its heartbeat
    (:mod:`loomcfm_core.run_status`): beside the data every process of a pipeline shares, not in MLflow."""
    return join(root(cfg), "holders")


# ---- evaluations ------------------------------------------------------------------------------------------

def evaluation_uri(cfg: Config, checkpoint: str, metric: str, methods: list[str], dataset_uri: str) -> str:
    """Where one evaluation's results go: ``<run>/eval/<checkpoint>/<metric>-n<samples>-<hash>`` for our runs
    (``<storage.root>/eval/<name>/...`` for outside checkpoints).

    The last part is keyed by what decides the numbers (metric, sample count, methods, dataset), so a second
    evaluation of the same checkpoint with other methods gets its own folder: nothing an earlier one wrote
    is overwritten or left beside results it does not belong to, and repeating one rewrites the same files.
    """
    run, sep, name = checkpoint.rpartition(f"/{CHECKPOINTS}/")
    stem = name.rsplit(".", 1)[0] if sep else checkpoint.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    base = join(run, EVAL, stem) if sep else join(root(cfg), EVAL, stem)
    digest = _digest({"metric": metric, "num_samples": cfg.eval.num_samples, "methods": methods,
                      "dataset": dataset_uri}, 8)
    return join(base, f"{metric}-n{cfg.eval.num_samples}-{digest}")


def with_absolute_paths(cfg: Config) -> Config:
    """A copy whose local locations mean the same in a process with another working directory (a Ray worker,
    a RayJob): :data:`LOCATIONS` and the autoencoder's files."""
    cfg = cfg.model_copy(deep=True)
    for key in LOCATIONS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value:
            setattr(getattr(cfg, section), name, absolute(value))
    autoencoder = cfg.model.autoencoder
    if autoencoder is not None:  # sampling workers decode with it
        autoencoder.weights = absolute(autoencoder.weights)
        autoencoder.config = autoencoder.config and absolute(autoencoder.config)
    return cfg
