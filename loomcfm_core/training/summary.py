"""``<run>/result.json``: what a finished training run commits, for the process that launched it.

Ray Train V2 keeps worker results only alongside Ray checkpoints, and a RayJob's driver runs in another pod
than the pipeline step waiting for it, so the summary crosses processes through storage. Rank 0 of ``fit``
writes it once, after the last checkpoint; its presence means the run finished.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from loomcfm_core.storage import join, storage_for

RESULT_FILE = "result.json"


@dataclass
class TrainSummary:
    """A finished run: where its checkpoint is and how its last logged interval went.

    ``metrics`` holds the last logged interval's means under their MLflow names (``train/loss``,
    ``coupling/swaps``, ...); ``table_hashes`` has one coupling-table hash per rank (``-`` for couplings
    without a table), equal when the ranks agreed.
    """

    run_uri: str
    dataset_uri: str
    step: int
    checkpoint_uri: str
    mlflow_run_id: str | None
    table_hashes: list[str]
    metrics: dict[str, float]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainSummary:
        return cls(**json.loads(text))


def write_summary(summary: TrainSummary) -> None:
    """Commit ``summary`` to ``<run>/result.json`` (atomically: a reader never sees half of it)."""
    storage_for(summary.run_uri).write_text(join(summary.run_uri, RESULT_FILE), summary.to_json())


def read_summary(run_uri: str) -> TrainSummary:
    """The summary a finished run committed (what another process — a pipeline step — reads back)."""
    return TrainSummary.from_json(storage_for(run_uri).read_text(join(run_uri, RESULT_FILE)))
