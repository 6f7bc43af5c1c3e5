"""MLflow run statuses that say what happened to a stage, even when its process could not say it itself.

- The process that opens a stage run holds it: a record ``<storage.root>/holders/<run id>.json``
  (:func:`loomcfm_core.layout.holders_uri`) names it (host, pid, start time) with a heartbeat renewed every
  ``HEARTBEAT_SECONDS``, and is removed when the run ends. The record lives beside the data every process of
  a pipeline shares, not in MLflow: bookkeeping is not what a person browsing the runs wants to read, and an
  MLflow outage must not decide whether a stage counts as alive.
- A stage stopped by SIGTERM/SIGINT ends KILLED, one that raised ends FAILED (``tracking.start_run``).
- A process killed outright (``kill -9``, a lost node) leaves its run RUNNING and its record behind; the next
  stage started in the experiment marks the run FAILED: at once when its holder ran on this host and is gone,
  else when the heartbeat is older than ``HEARTBEAT_TTL``.
- A parent (pipeline) run takes the status of a child that failed or was killed, so the runs table does not
  show FINISHED over a failed stage.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from loomcfm_core.errors import StorageError
from loomcfm_core.processes import Holder, gone
from loomcfm_core.storage import join, storage_for

ENDED_BY_TAG = "loomcfm.ended_by"
ATTEMPTS_TAG, ATTEMPT_TAG = "loomcfm.attempts", "loomcfm.attempt.{}"  # how many; how each earlier one ended
PROGRESS_METRIC = "train/loss"  # the last step a training attempt logged
HEARTBEAT_SECONDS = 30.0
HEARTBEAT_TTL = 5 * HEARTBEAT_SECONDS
FAILED, KILLED = "FAILED", "KILLED"
log = logging.getLogger(__name__)


def holder_record_uri(holders: str, run_id: str) -> str:
    """The record of the process holding MLflow run ``run_id``, in the folder ``holders``."""
    return join(holders, f"{run_id}.json")


def read_holder(holders: str, run_id: str) -> tuple[Holder, float] | None:
    """The holder of a run and its last heartbeat (seconds since the epoch), or None when no record is left."""
    uri = holder_record_uri(holders, run_id)
    try:
        record = json.loads(storage_for(uri).read_text(uri))
    except (StorageError, FileNotFoundError, ValueError):
        return None
    return Holder.from_dict(record["holder"]), float(record["heartbeat"])


def _write(uri: str) -> None:
    storage_for(uri).write_text(uri, json.dumps({"holder": Holder.me().to_dict(), "heartbeat": time.time()}))


@contextmanager
def held(holders: str, client: MlflowClient, run_id: str) -> Iterator[None]:
    """Record this process as the run's holder and keep its heartbeat fresh for the ``with`` body; the record
    goes when the body ends, however it ends (the run's status says how). A run reopened to resume loses the
    note of how it ended before."""
    if ENDED_BY_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, ENDED_BY_TAG)
    uri = holder_record_uri(holders, run_id)
    _write(uri)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                _write(uri)
            except Exception as exc:  # noqa: BLE001 - a missed beat must not stop the stage it reports on
                log.warning("heartbeat of MLflow run %s (%s) failed: %s", run_id, uri, exc)

    thread = threading.Thread(target=beat, name=f"loomcfm-heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        try:
            storage_for(uri).delete(uri)
        except Exception as exc:  # noqa: BLE001 - a left record only makes the next stage look at the run
            log.warning("could not remove %s: %s", uri, exc)


@dataclass
class Attempt:
    """How an earlier attempt of a run ended, read before a new attempt reopens it: its status (RUNNING when
    its process was killed outright and nobody noticed yet), why, and the last step it logged."""

    status: str
    reason: str
    last_step: int | None

    @classmethod
    def of(cls, client: MlflowClient, run_id: str) -> Attempt | None:
        try:
            run = client.get_run(run_id)
            history = client.get_metric_history(run_id, PROGRESS_METRIC)
        except MlflowException:
            return None  # not in this store (the run is started anew)
        reason = run.data.tags.get(ENDED_BY_TAG, "")
        if run.info.status == RunStatus.to_string(RunStatus.RUNNING):
            reason = "its process died without a word (kill -9, a lost node)"
        return cls(run.info.status, reason, max((m.step for m in history), default=None))


def record_attempt(client: MlflowClient, run_id: str, earlier: Attempt, resumed_step: int) -> str:
    """Record on a reopened run how its previous attempt ended and where this one resumes; returns the tag.

    The run keeps ``loomcfm.attempts`` (this attempt's number) and a ``loomcfm.attempt.<n>`` per earlier
    attempt, so a training killed and resumed still shows that it was, and at which step.
    """
    number = int(client.get_run(run_id).data.tags.get(ATTEMPTS_TAG, "1"))
    status = "RUNNING, died" if earlier.status == RunStatus.to_string(RunStatus.RUNNING) else earlier.status
    step = "no step logged" if earlier.last_step is None else f"last logged step {earlier.last_step}"
    text = f"{status} ({step}{'; ' + earlier.reason if earlier.reason else ''}); resumed from step {resumed_step}"
    client.set_tag(run_id, ATTEMPT_TAG.format(number), text[:5000])
    client.set_tag(run_id, ATTEMPTS_TAG, str(number + 1))
    return text


def mark_parent(client: MlflowClient, parent_run_id: str | None, status: str) -> None:
    """Give a parent run the status of a child that ended ``FAILED`` or ``KILLED`` (a parent that already
    failed keeps its status)."""
    if not parent_run_id:
        return
    parent = client.get_run(parent_run_id)
    if parent.info.status in (RunStatus.to_string(RunStatus.RUNNING), RunStatus.to_string(RunStatus.FINISHED)):
        client.set_terminated(parent_run_id, status)


def end_as(client: MlflowClient, run_id: str, status: str, parent_run_id: str | None, reason: str) -> None:
    """End a run with ``status`` (and its parent, :func:`mark_parent`), saying why in a tag."""
    client.set_tag(run_id, ENDED_BY_TAG, reason)
    client.set_terminated(run_id, status)
    mark_parent(client, parent_run_id, status)


def reap_dead_runs(client: MlflowClient, experiment_id: str, holders: str) -> list[str]:
    """Mark FAILED the RUNNING runs of the experiment whose holder (a record in ``holders``) is gone; returns
    their ids. A RUNNING run without a record is not a stage's (someone opened it by hand) and stays."""
    me, reaped = Holder.me(), []
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=500)
    for run in running:
        found = read_holder(holders, run.info.run_id)
        if found is None:
            continue
        holder, heartbeat = found
        if holder == me or not gone(holder, heartbeat, HEARTBEAT_TTL):
            continue
        tags = run.data.tags
        end_as(client, run.info.run_id, FAILED, tags.get("mlflow.parentRunId"),
               f"found dead by {me}: its process ({holder}) was gone")
        log.warning("MLflow run %s (%s) was left RUNNING by %s, which is gone: marked FAILED",
                    run.info.run_id, tags.get("loomcfm.stage", "?"), holder)
        uri = holder_record_uri(holders, run.info.run_id)
        storage_for(uri).delete(uri)
        reaped.append(run.info.run_id)
    return reaped
