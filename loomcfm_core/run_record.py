"""What a stage's MLflow run records about itself: a name and tags that say what it is, the config settings that
define that stage (not all of them on every run), the resolved config file, the latent space, the dataset.

Params are what runs are filtered and compared by, so each stage logs only the sections that decide its
result (:data:`STAGE_KEYS`), every location as the absolute URI it used; the whole resolved config is the
``config.yaml`` artifact of every run, to rerun or load it exactly.
"""

from __future__ import annotations

import hashlib
import json

import mlflow
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource, S3ArtifactDatasetSource
from mlflow.entities import LoggedModelInput
from mlflow.entities.model_registry import ModelVersion

from loomcfm_core import provenance
from loomcfm_core.config import Config
from loomcfm_core.data.manifest import read_manifest
from loomcfm_core.errors import TrackingError
from loomcfm_core.layout import with_absolute_paths
from loomcfm_core.models.autoencoder import LatentSpace
from loomcfm_core.storage import absolute, is_remote
from loomcfm_core.tracking import STAGE_TAG

CONFIG_ARTIFACT = "config.yaml"
EVAL_KEYS = ("eval.methods", "eval.num_samples", "eval.batch_size", "eval.feature_network", "eval.inception_weights",
             "eval.inception_sha256")
# The config keys (a key, or a section's prefix) that define each stage's result; the pipeline records all but
# where its RayJobs run (kube.*, which the train stage's RayJob records in its own spec).
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "cache": ("name", "data", "model.autoencoder", "storage.root"),
    "train": ("name", "data", "model", "coupling", "train", "ray.num_workers", "ray.use_gpu", "storage.root",
              "eval.every_steps", "eval.during_training"),
    "evaluate": ("name", *EVAL_KEYS, "model.autoencoder"),
    "pairs": ("name", "reflow.method", "reflow.num_pairs", "reflow.target_dtype", "sample.batch_size",
              "model.autoencoder", "storage.root"),
    "ablation": ("name", "coupling", "train", *EVAL_KEYS),
}
LOCAL_DIRS = ("data.local_cache", "tracking.local_dir")
DATASET_DIGEST_CHARS = 32  # MLflow takes at most 36


def stage_kind(stage: str) -> str:
    """``train_reflow`` is a ``train`` stage, ``evaluate_reflow`` an ``evaluate`` one."""
    return stage.removesuffix("_reflow")


def config_params(cfg: Config, stage: str | None = None) -> dict[str, str]:
    """The settings that define ``stage`` (all but ``kube.*`` for the pipeline or ``None``) as MLflow param
    strings: strings as they are, everything else as JSON, locations absolute.

    JSON (``[1, 2]``, ``null``, ``true``) rather than Python's ``str`` so a value can be pasted back into
    ``--set key=value`` or parsed by a program comparing runs.
    """
    flat = with_absolute_paths(cfg).flat()
    for key in LOCAL_DIRS:
        flat[key] = absolute(flat[key])
    wanted = STAGE_KEYS.get(stage_kind(stage or ""))
    keep = (lambda key: any(key == p or key.startswith(p + ".") for p in wanted)) if wanted else \
        (lambda key: not key.startswith("kube."))
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in flat.items() if keep(key)}


def stage_tags(cfg: Config, stage: str) -> dict[str, str]:
    """The tags a new stage run starts with: its stage and where it came from (:mod:`loomcfm_core.provenance`)."""
    return {STAGE_TAG: stage, **provenance.run_tags(cfg.name, cfg.to_yaml())}


def log_config(cfg: Config, stage: str | None = None) -> None:
    """Record the config on the active run: the stage's settings as params (:func:`config_params`) and the
    whole resolved config as ``config.yaml`` (``load_config_text`` reads it back).

    MLflow's client already splits params into batches of 100 and truncates values over 6000 characters
    (with a warning), so neither needs handling here.
    """
    if mlflow.active_run() is None:
        # mlflow.log_params would silently start a run in the default experiment and store.
        raise TrackingError("log_config needs an active run; call it inside `with start_run(...)`")
    mlflow.log_params(config_params(cfg, stage))
    mlflow.log_text(cfg.to_yaml(), CONFIG_ARTIFACT)


def log_latent_space(space: dict | None) -> None:
    """Record a latent run's autoencoder (kind, format, path, sha256, ...) and the scale in effect on the
    active run, as ``autoencoder.*`` params and ``autoencoder.json``; nothing for a pixel-space run.

    The scale is its own param: the config's ``model.autoencoder.scale`` is often null (computed at cache
    time), and MLflow never lets a param change once logged.
    """
    if space is None:
        return
    mlflow.log_params(LatentSpace.from_dict(space).params())
    mlflow.log_dict(space, "autoencoder.json")


def dataset_digest(manifest: dict) -> str:
    """A manifest's hash (what identifies a cached dataset's content), short enough for MLflow."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:DATASET_DIGEST_CHARS]


def log_dataset(uri: str, manifest: dict, context: str) -> None:
    """Record a cached dataset as an input of the active run (MLflow's Datasets column and filter): its name,
    its URI as the source, its manifest's hash as the digest; ``context`` says how the run used it."""
    uri = absolute(uri)
    source = S3ArtifactDatasetSource(uri) if is_remote(uri) else LocalArtifactDatasetSource(uri)
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    mlflow.log_input(MetaDataset(source, name=name, digest=dataset_digest(manifest)), context=context)


def log_evaluated(cfg: Config, checkpoint_uri: str, images_uri: str, version: ModelVersion | None) -> None:
    """On an evaluation's run: what it scored (the checkpoint, the registered version and the run that trained
    it, the model itself as the run's input) and against which images (a dataset input)."""
    mlflow.log_params({"checkpoint_uri": absolute(checkpoint_uri), "dataset_uri": absolute(images_uri),
                       "model_version": f"{cfg.registered_model}/{version.version}" if version else "",
                       "training_run_id": (version.run_id or "") if version else ""})
    log_dataset(images_uri, read_manifest(images_uri) or {}, context="evaluation")
    if version is not None and version.source.startswith("models:/"):
        mlflow.MlflowClient().log_inputs(mlflow.active_run().info.run_id,
                                         models=[LoggedModelInput(version.source.removeprefix("models:/"))])
