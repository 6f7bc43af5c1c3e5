"""The registered model: an ``mlflow.pyfunc`` generator, so images come out of the registry without our
code's entry points or an ODE solver of the caller's own; registered once per checkpoint as
``loomcfm-<name>`` (``Config.registered_model``), its versions described by their evaluations.

``predict`` takes a table with either ``num_images`` (one row: that many images from the same noise seeds
``loomcfm sample`` uses) or ``seed`` (one row per image, explicit noise seeds), and the param ``method``
(``<solver>-<steps>``, default ``sample.method``); it returns uint8 images ``[n, C, H, W]``. The model
directory holds the EMA weights and the config YAML they were trained with, so ``mlflow models serve``
rebuilds exactly the trained network.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from loomcfm_core.config import Config, TrackingConfig, load_config_text
from loomcfm_core.errors import LoomcfmError, UsageError
from loomcfm_core.models.loading import build_model, default_device
from loomcfm_core.choices import check_method
from loomcfm_core.sampling import generate, sample_seeds, to_uint8
from loomcfm_core.tracking import tracking_uri

EXAMPLE_IMAGES = 2
CHECKPOINT_TAG, CHECKPOINT_SHA_TAG = "loomcfm.checkpoint_uri", "loomcfm.checkpoint_sha256"
SAMPLES_TAG = "loomcfm.eval_num_samples"  # how many samples the distance tags of a version were scored with
log = logging.getLogger(__name__)


def sample_seed_offset(cfg: Config) -> int:
    """Where ``loomcfm sample``'s noise seeds start for a config (the registered generator uses the same)."""
    return cfg.train.seed << 32


def signature(cfg: Config) -> ModelSignature:
    inputs = Schema([ColSpec("long", "num_images", required=False), ColSpec("long", "seed", required=False)])
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, *cfg.data.shape))])
    params = ParamSchema([ParamSpec("method", "string", cfg.sample.method)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


class Generator(mlflow.pyfunc.PythonModel):
    """The EMA network plus the sampler: noise seeds in, uint8 images out."""

    def load_context(self, context) -> None:
        self.cfg = load_config_text(Path(context.artifacts["config"]).read_text())
        self.device = default_device()
        self.model = build_model(self.cfg)
        self.model.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))
        self.model.to(self.device).eval()

    def seeds(self, model_input: pd.DataFrame) -> torch.Tensor:
        """The noise seeds a request asks for: explicit ``seed`` rows, or ``num_images`` like ``loomcfm sample``."""
        columns = [c for c in ("seed", "num_images") if c in model_input.columns and model_input[c].notna().any()]
        if len(columns) != 1:
            raise UsageError("predict takes a 'num_images' column (one row) or a 'seed' column (one row per image), "
                             f"got columns {list(model_input.columns)}")
        cap = self.cfg.sample.max_request_images
        if columns[0] == "seed":
            seeds = model_input["seed"].dropna()
            if len(seeds) > cap:
                raise UsageError(f"predict: {len(seeds)} 'seed' rows, but one request may ask for at most {cap} "
                                 "images (sample.max_request_images): split the request")
            return torch.tensor(seeds.astype("int64").to_numpy())
        count = model_input["num_images"].dropna().tolist()
        if len(count) != 1 or count[0] != int(count[0]) or not 1 <= count[0] <= cap:
            raise UsageError(f"predict: 'num_images' must be one whole number from 1 to {cap} "
                             f"(sample.max_request_images), got {count}")
        return sample_seeds(int(count[0]), offset=sample_seed_offset(self.cfg))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        try:
            method = check_method((params or {}).get("method") or self.cfg.sample.method)
            seeds = self.seeds(model_input)
        except LoomcfmError as exc:  # the scoring server answers an MlflowException with its code and message,
            # anything else with 400 and a generic "unexpected error", our reason buried in the stack trace
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
        samples = generate(self.model, self.cfg.data.shape, method, seeds, self.cfg.sample.batch_size, self.device)
        return to_uint8(samples.images).numpy()


def log_generator(cfg: Config, model: torch.nn.Module, registered_model_name: str):
    """Log (and register) the generator of ``model``'s weights into the active run; returns MLflow's model info."""
    with tempfile.TemporaryDirectory(prefix="loomcfm-model-") as tmp:
        weights, config = Path(tmp) / "ema.pt", Path(tmp) / "config.yaml"
        torch.save(model.state_dict(), weights)
        config.write_text(cfg.to_yaml())
        example = (pd.DataFrame({"num_images": [EXAMPLE_IMAGES]}), {"method": cfg.sample.method})
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).with_name("generator_code.py")), artifacts={"weights": str(weights), "config": str(config)},
            signature=signature(cfg), input_example=example, registered_model_name=registered_model_name,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "loomcfm", "pandas"])


def register_model(cfg: Config, run_id: str, model: torch.nn.Module, alias: str, checkpoint_uri: str,
                   checkpoint_sha256: str) -> str:
    """Register the generator of a checkpoint's model as ``Config.registered_model`` with ``alias``; returns
    the version.

    A checkpoint is registered once: its version is tagged with the checkpoint's URI and sha256, and a
    rerun of a finished training (same checkpoint, same bytes) gets that version back, with the alias
    moved to it, instead of a new one. Evaluation writes its FD-vs-NFE table into the version's description
    (:func:`describe_checkpoint`).
    """
    name = cfg.registered_model
    uri = tracking_uri(cfg.tracking)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    found = client.search_model_versions(f"name = '{name}' and tags.`{CHECKPOINT_SHA_TAG}` = '{checkpoint_sha256}'")
    same = [v for v in found if v.tags.get(CHECKPOINT_TAG) == checkpoint_uri]
    if same:
        version = str(min(int(v.version) for v in same))
        log.info("%s is registered already as %s version %s", checkpoint_uri, name, version)
    else:
        with mlflow.start_run(run_id=run_id, nested=True):
            info = log_generator(cfg, model.cpu().eval(), name)
        version = str(info.registered_model_version)
        client.set_model_version_tag(name, version, CHECKPOINT_TAG, checkpoint_uri)
        client.set_model_version_tag(name, version, CHECKPOINT_SHA_TAG, checkpoint_sha256)
    client.set_registered_model_alias(name, alias, version)
    return version


def checkpoint_versions(settings: TrackingConfig, name: str, checkpoint_uri: str) -> list[ModelVersion]:
    """The versions of the registered model ``name`` made from this checkpoint (none when it was never
    registered, e.g. evaluated before training ended), oldest first."""
    client = MlflowClient(tracking_uri(settings))
    found = [v for v in client.search_model_versions(f"name = '{name}'")
             if v.tags.get(CHECKPOINT_TAG) == checkpoint_uri]
    return sorted(found, key=lambda v: int(v.version))


def describe_checkpoint(settings: TrackingConfig, name: str, checkpoint_uri: str, text: str | None,
                        scores: dict[str, float] | None = None, samples: int | None = None) -> list[str]:
    """Make ``text`` (an evaluation's table; None: leave it) the description of every version of the registered
    model ``name`` made from this checkpoint, and tag it with each method's distance (``scores``:
    ``{"fd_digits/euler-2": ...}``, from ``samples`` samples), so the registry can be filtered (and, on the
    client, sorted) by quality; returns those versions.

    Args:
        settings: the ``tracking`` section (the store the registry is in).
    """
    client = MlflowClient(tracking_uri(settings))
    versions = [str(v.version) for v in checkpoint_versions(settings, name, checkpoint_uri)]
    for version in versions:
        if text is not None:
            client.update_model_version(name, version, description=text)
        for key, value in (scores or {}).items():
            client.set_model_version_tag(name, version, key, f"{value:.6g}")
        if samples:
            client.set_model_version_tag(name, version, SAMPLES_TAG, str(samples))
    return versions


def best_alias(method: str) -> str:
    """The alias of the version that samples best with ``method``: ``best-euler-2``."""
    return f"best-{method}"


def move_best_alias(settings: TrackingConfig, name: str, key: str, method: str) -> str | None:
    """Point :func:`best_alias` of ``method`` at the version with the lowest distance tag ``key``
    (``fd_digits/euler-2``) among those scored with as many samples as the newest scored one (a distance from
    fewer samples is biased upwards: not comparable); returns that version."""
    client = MlflowClient(tracking_uri(settings))
    scored = [v for v in client.search_model_versions(f"name = '{name}'") if key in v.tags]
    if not scored:
        return None
    samples = max(scored, key=lambda v: int(v.version)).tags.get(SAMPLES_TAG)
    best = min((v for v in scored if v.tags.get(SAMPLES_TAG) == samples), key=lambda v: float(v.tags[key]))
    client.set_registered_model_alias(name, best_alias(method), best.version)
    return str(best.version)
