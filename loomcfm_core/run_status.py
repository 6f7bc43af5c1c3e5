"""MLflow run statuses that say what happened to a stage, even when its process could not say it itself.

- A stage run records its holder (host, pid, start time) and a heartbeat tag renewed every
  ``HEARTBEAT_SECONDS`` while it runs.
- A stage stopped by SIGTERM/SIGINT ends KILLED, one that raised ends FAILED (``tracking.start_run``).
- A process killed outright (``kill -9``, a lost node) leaves its run RUNNING; the next stage started in
  the experiment marks it FAILED: at once when its holder ran on this host and is gone, else when its
  heartbeat is older than ``HEARTBEAT_TTL``.
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

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from loomcfm_core.processes import Holder, gone

HOLDER_TAG = "loomcfm.holder"
HEARTBEAT_TAG = "loomcfm.heartbeat"
ENDED_BY_TAG = "loomcfm.ended_by"
HEARTBEAT_SECONDS = 30.0
HEARTBEAT_TTL = 5 * HEARTBEAT_SECONDS
FAILED, KILLED = "FAILED", "KILLED"
log = logging.getLogger(__name__)


def holder_tags() -> dict[str, str]:
    """This process as a run's holder, with a fresh heartbeat: tags a new run is created with, so that a
    process killed right after creating it still leaves a run the next stage can tell is dead."""
    return {HOLDER_TAG: json.dumps(Holder.me().to_dict()), HEARTBEAT_TAG: f"{time.time():.0f}"}


@contextmanager
def alive(client: MlflowClient, run_id: str) -> Iterator[None]:
    """Tag the run with this process as its holder and keep its heartbeat fresh for the ``with`` body (a run
    reopened to resume loses the note of how it ended before)."""
    if ENDED_BY_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, ENDED_BY_TAG)
    for key, value in holder_tags().items():
        client.set_tag(run_id, key, value)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            except Exception as exc:  # noqa: BLE001 - a missed beat must not stop the stage it reports on
                log.warning("MLflow heartbeat of run %s failed: %s", run_id, exc)

    thread = threading.Thread(target=beat, name=f"loomcfm-heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


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


def reap_dead_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs of the experiment whose holder is gone; returns their ids."""
    me, reaped = Holder.me(), []
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=500)
    for run in running:
        tags = run.data.tags
        if HOLDER_TAG not in tags:
            continue  # not held by a stage process (e.g. a run someone opened by hand)
        holder = Holder.from_dict(json.loads(tags[HOLDER_TAG]))
        if holder == me or not gone(holder, float(tags.get(HEARTBEAT_TAG, 0)), HEARTBEAT_TTL):
            continue
        end_as(client, run.info.run_id, FAILED, tags.get("mlflow.parentRunId"),
               f"found dead by {me}: its process ({holder}) was gone")
        log.warning("MLflow run %s (%s) was left RUNNING by %s, which is gone: marked FAILED",
                    run.info.run_id, tags.get("loomcfm.stage", "?"), holder)
        reaped.append(run.info.run_id)
    return reaped
