"""A training's result: what a finished run commits to ``<run>/result.json``, and the model the train stage
registered from it, beside it in ``registered-model.json``.

Ray Train V2 keeps worker results only alongside Ray checkpoints, and a RayJob's driver runs in another pod
than the pipeline step waiting for it, so the result crosses processes through storage. Rank 0 of ``fit``
writes ``result.json`` once, after the last checkpoint (its presence means the run finished); the train
stage adds the registration once the model is registered. A launcher in another process reads both back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from loomcfm_core.storage import join, storage_for

RESULT_FILE = "result.json"
REGISTRATION_FILE = "registered-model.json"
REGISTRATION = ("model_version", "model_alias")


@dataclass
class TrainResult:
    """A finished training: where its checkpoint is and how its last logged interval went, and once the train
    stage registered it, the model version under ``model_alias`` (``base`` or ``reflow``).

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
    model_version: str | None = None
    model_alias: str | None = None

    def to_json(self) -> str:
        """The training's part (``result.json``): the registration has a file of its own."""
        return json.dumps({k: v for k, v in asdict(self).items() if k not in REGISTRATION}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainResult:
        return cls(**json.loads(text))


def write_result(result: TrainResult) -> None:
    """Commit a finished training to ``<run>/result.json`` (atomically: a reader never sees half of it)."""
    storage_for(result.run_uri).write_text(join(result.run_uri, RESULT_FILE), result.to_json())


def write_registration(result: TrainResult) -> None:
    """Record the registration beside ``result.json``, for a launcher in another process (the pipeline step
    that waits for a RayJob) to read back with :func:`read_result`."""
    record = {key: getattr(result, key) for key in REGISTRATION}
    storage_for(result.run_uri).write_text(join(result.run_uri, REGISTRATION_FILE), json.dumps(record, indent=2))


def finished(run_uri: str) -> bool:
    """Whether a run committed its result (a later rerun of a finished training has nothing to train)."""
    return storage_for(run_uri).exists(join(run_uri, RESULT_FILE))


def read_result(run_uri: str, registered: bool = False) -> TrainResult:
    """The result a run committed (what another process, a pipeline step, reads back).

    Args:
        registered: also read the registration the train stage recorded (a missing one is an error).
    """
    store = storage_for(run_uri)
    result = TrainResult.from_json(store.read_text(join(run_uri, RESULT_FILE)))
    if registered:
        record = json.loads(store.read_text(join(run_uri, REGISTRATION_FILE)))
        result.model_version, result.model_alias = record["model_version"], record["model_alias"]
    return result
