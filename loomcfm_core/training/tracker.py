"""Rank 0's MLflow run for the train stage: interval-averaged metrics, evaluations during training, the latest
checkpoint, system metrics.

Every rank calls :meth:`Tracker.step_done` (the interval means are averaged across ranks, a collective), but
only rank 0 opens the run and logs, so a multi-worker training is one MLflow run. What rank 0 logs goes
through a :class:`~loomcfm_core.metric_sink.MetricSink`: a tracking server that is slow or gone never holds
a step up. System metrics are those of rank 0's machine.
"""

from __future__ import annotations

import time

import mlflow
import torch

from loomcfm_core import provenance, run_record, tracking
from loomcfm_core.config import Config
from loomcfm_core.evaluation.during_training import Score
from loomcfm_core.layout import holders_uri
from loomcfm_core.metric_sink import MetricSink
from loomcfm_core.system_metrics import system_metrics
from loomcfm_core.training.distributed import mean_across_ranks
from loomcfm_core.training.step import TrainState

LATEST_CHECKPOINT_TAG = "loomcfm.latest_checkpoint"


def train_label(cfg: Config) -> str:
    """The train stage's name: ``train_reflow`` for a reflow training, else ``train``."""
    return "train_reflow" if cfg.is_reflow else "train"


class Tracker:
    """Logs a training run; ``last`` holds the most recently logged interval's means.

    Args:
        tags: set on a new run (the run and dataset URIs).
        resumed_from: the checkpoint a resumed run continues from (the config is then already logged).
        run_id: the MLflow run a resumed training keeps logging into, from its checkpoint.
        attach: ``run_id`` is held by another process (the driver that started the workers, which logged the
            config and ends the run); only log into it.
    """

    def __init__(self, cfg: Config, state: TrainState, rank: int, steps_per_epoch: int, parent_run_id: str | None,
                 tags: dict[str, str], resumed_from: str | None, run_id: str | None, attach: bool = False) -> None:
        self.cfg, self.state, self.rank, self.steps_per_epoch = cfg, state, rank, steps_per_epoch
        self.parent_run_id, self.tags, self.resumed_from, self.run_id = parent_run_id, tags, resumed_from, run_id
        self.attach = attach
        self.last: dict[str, float] = {}
        # The pairs coupling serves stored noise: its costs before and after are one number, and nothing swaps.
        self.coupling_metrics = cfg.coupling.kind != "pairs"
        self._reset()

    def _reset(self) -> None:
        self.sums = {"loss": 0.0, "grad_norm": 0.0, "cost_before": 0.0, "cost_after": 0.0, "swaps": 0.0}
        self.count, self.images, self.started = 0, 0, time.perf_counter()

    def __enter__(self) -> Tracker:
        if self.rank == 0:
            stage = train_label(self.cfg)
            self._run = tracking.start_run(
                self.cfg.tracking, self.cfg.experiment, provenance.run_name(self.cfg.name, stage),
                parent_run_id=self.parent_run_id, tags={**run_record.stage_tags(self.cfg, stage), **self.tags},
                run_id=self.run_id, attach=self.attach, holders=None if self.attach else holders_uri(self.cfg))
            self.run_id = self._run.__enter__().info.run_id
            if not self.attach and self.resumed_from is None:
                run_record.log_config(self.cfg, stage)
            elif not self.attach:
                mlflow.set_tag("loomcfm.resumed_from", self.resumed_from)
            # Only the workers know the latent space (the dataset's); the params are the same on every resume.
            run_record.log_latent_space(self.state.targets.space)
            uri = tracking.tracking_uri(self.cfg.tracking)
            self.sink = MetricSink(uri, self.run_id)
            self._system = system_metrics(uri, self.run_id, self.cfg.tracking.system_metrics_seconds)
            self._system.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.rank == 0:
            self._system.__exit__(*exc)
            self.sink.close()
            self._run.__exit__(*exc)

    def step_done(self, metrics: dict, global_images: int) -> None:
        """Add a step's metrics; every ``train.log_every`` steps, log the interval's means across ranks."""
        for key in self.sums:  # tensors stay on the device: no host sync until a log step
            self.sums[key] = self.sums[key] + metrics[key]
        self.count += 1
        self.images += global_images
        if self.state.step % self.cfg.train.log_every:
            return
        means = mean_across_ranks(torch.tensor([float(self.sums[k]) / self.count for k in self.sums],
                                               dtype=torch.float64, device=self.state.device))
        elapsed = time.perf_counter() - self.started
        loss, grad_norm, before, after, swaps = means.cpu().tolist()
        coupling = {"coupling/cost_before": before, "coupling/cost_after": after, "coupling/swaps": swaps}
        self.last = {"train/loss": loss, "train/grad_norm": grad_norm,
                     **(coupling if self.coupling_metrics else {}),
                     "throughput/images_per_s": self.images / elapsed,
                     "train/lr": self.state.scheduler.get_last_lr()[0],
                     "train/epoch": self.state.step / self.steps_per_epoch}
        if self.rank == 0:
            self.sink.metrics(self.last, step=self.state.step)
        self._reset()

    def scored(self, score: Score | None) -> None:
        """Log an evaluation during training at this step (rank 0, which gets the score)."""
        if self.rank == 0 and score is not None:
            self.last[score.key] = score.distance  # the last one reaches the result (and the registered version)
            self.sink.metrics({score.key: score.distance}, step=self.state.step)
            self.sink.image(score.grid, key=f"during_training/{score.method}", step=self.state.step)

    def checkpoint_saved(self, uri: str) -> None:
        """Point the run at its newest checkpoint (rank 0, which writes checkpoints)."""
        self.sink.tag(LATEST_CHECKPOINT_TAG, uri, step=self.state.step)
