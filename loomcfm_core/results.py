"""What each pipeline stage returns: typed results the CLI prints and the KFP components report from.

Every result is a plain dataclass, so ``dataclasses.asdict`` turns it into the JSON the CLI prints. The train
stage's :class:`TrainResult` is what a training run commits to storage (:mod:`loomcfm_core.training.result`).
"""

from __future__ import annotations

from dataclasses import dataclass

from loomcfm_core.training.result import TrainResult


@dataclass
class MethodResult:
    """One sampling method's row of an evaluation: its NFE, the distance to the data, the seconds it took."""

    method: str
    nfe: float
    distance: float
    seconds: float


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
class EvalResult:
    """Distance (``metric``: ``fid`` or ``fd_<dataset>``) and NFE per method; grids and plot under ``eval_uri``."""

    metric: str
    eval_uri: str
    checkpoint_uri: str
    rows: list[MethodResult]
    table: str

    def metrics(self) -> dict[str, float]:
        """``<metric>/<method>`` (the distance) and ``nfe/<method>`` of every row: how a run records it."""
        return {f"{kind}/{row.method}": value for row in self.rows
                for kind, value in ((self.metric, row.distance), ("nfe", row.nfe))}


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
