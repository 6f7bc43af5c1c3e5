"""What each pipeline stage returns: typed results the CLI prints and the KFP components report from.

Every result is a plain dataclass, so ``dataclasses.asdict`` turns it into the JSON the CLI prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from loomcfm_core.evaluation import MethodResult
from loomcfm_core.storage import join, storage_for
from loomcfm_core.training.summary import TrainSummary, read_summary

REGISTRATION_FILE = "registered-model.json"


@dataclass
class CacheResult:
    """The cached dataset training reads; ``classifier_val_accuracy`` is set when this call trained the
    digits classifier (evaluation's feature network for the embedded dataset). With an autoencoder,
    ``dataset_uri`` is the latent cache, ``images_uri`` the images it was encoded from and ``latent_scale``
    the scale in effect; ``num_train`` and ``num_val`` count images."""

    dataset_uri: str
    created: bool
    num_train: int
    num_val: int
    classifier_val_accuracy: float | None = None
    images_uri: str | None = None
    latent_scale: float | None = None


@dataclass
class TrainResult(TrainSummary):
    """A finished run's summary plus the model version it registered under ``model_alias``."""

    model_version: str
    model_alias: str

    def commit_registration(self) -> None:
        """Record the registration beside ``result.json``, for a launcher in another process (the pipeline
        step that waits for a RayJob) to read back with :meth:`read`."""
        record = {"model_version": self.model_version, "model_alias": self.model_alias}
        storage_for(self.run_uri).write_text(join(self.run_uri, REGISTRATION_FILE), json.dumps(record, indent=2))

    @classmethod
    def read(cls, run_uri: str) -> TrainResult:
        """The result a train stage in another process committed: its run's summary and registration."""
        record = json.loads(storage_for(run_uri).read_text(join(run_uri, REGISTRATION_FILE)))
        return cls(**vars(read_summary(run_uri)), **record)


@dataclass
class EvalResult:
    """Distance (``metric``: ``fid`` or ``fd_<dataset>``) and NFE per method; grids and plot under ``eval_uri``."""

    metric: str
    eval_uri: str
    checkpoint_uri: str
    rows: list[MethodResult]
    table: str


@dataclass
class PairsResult:
    pairs_uri: str
    num_pairs: int
    method: str


@dataclass
class SampleResult:
    output: str
    num_images: int
    method: str
    nfe: float
    grid: str


@dataclass
class RunResult:
    """The whole pipeline under one parent MLflow run; ``summary`` is the base-vs-reflow table."""

    parent_run_id: str
    tracking_uri: str
    dataset_uri: str
    base: TrainResult
    base_eval: EvalResult
    pairs: PairsResult
    reflow: TrainResult
    reflow_eval: EvalResult
    summary: str
