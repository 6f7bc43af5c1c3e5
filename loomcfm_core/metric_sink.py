"""A training's metrics, tags and pictures on their way to MLflow, sent by a thread of their own.

The training loop only queues them, so a slow or absent tracking server never holds a step up. When the
server stops answering, what is queued stays in memory and is sent once it answers again (one warning when
it stops, one line when it is back); whatever is still unsent when the training ends, after a short grace,
is dropped and said once, counted in values and steps. Checkpoints are the record of a training, so an
outage costs tracking data at most.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from loomcfm_core.tracking import quick_calls

log = logging.getLogger(__name__)
RETRY_SECONDS = 2.0
MAX_PENDING = 200_000  # queued values kept through an outage; the oldest go first beyond it
BATCH = 900  # MLflow's log_batch takes at most 1000 metrics


@dataclass
class _Item:
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    image: tuple | None = None  # (array, key)

    @property
    def values(self) -> int:
        return len(self.metrics) + len(self.tags) + (self.image is not None)


class MetricSink:
    """Send ``metrics``/``tag``/``image`` calls to run ``run_id`` of the store ``uri`` in order, from a thread."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id, self.client = uri, run_id, MlflowClient(uri)
        self._queue: deque[_Item] = deque()
        self._wake = threading.Condition()
        self._closing, self._down_since = False, None
        self._give_up = threading.Event()
        self.lost: list[_Item] = []
        self._thread = threading.Thread(target=self._run, name="loomcfm-metrics", daemon=True)
        self._thread.start()

    def _put(self, item: _Item) -> None:
        with self._wake:
            self._queue.append(item)
            while sum(i.values for i in self._queue) > MAX_PENDING:
                self.lost.append(self._queue.popleft())
            self._wake.notify()

    def metrics(self, values: dict[str, float], step: int) -> None:
        self._put(_Item(step, metrics=dict(values)))

    def tag(self, key: str, value: str, step: int) -> None:
        self._put(_Item(step, tags={key: value}))

    def image(self, image, key: str, step: int) -> None:
        """A picture as MLflow's step-indexed image ``key`` (the UI shows it with a step slider)."""
        self._put(_Item(step, image=(image, key)))

    def _send(self, items: list[_Item]) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, i.step) for i in items for k, v in i.metrics.items()]
        tags = [RunTag(k, v) for i in items for k, v in i.tags.items()]
        with quick_calls(retries=0, timeout=10):
            if metrics or tags:
                self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
            for item in items:
                if item.image is not None:
                    self.client.log_image(self.run_id, item.image[0], key=item.image[1], step=item.step,
                                          synchronous=True)

    def _next_batch(self) -> list[_Item]:
        batch, size = [], 0
        for item in self._queue:
            if batch and (size + item.values > BATCH or item.image is not None):
                break
            batch.append(item)
            size += item.values
            if item.image is not None:
                break
        return batch

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                batch = self._next_batch()
            try:
                self._send(batch)
            except Exception as exc:  # noqa: BLE001 - whatever the store says, the training goes on
                if isinstance(exc, MlflowException) and exc.error_code == "INVALID_PARAMETER_VALUE":
                    log.warning("MLflow refused metrics of step %d: %s", batch[0].step, exc.message)
                    self._drop(batch, lost=True)
                    continue
                if self._down_since is None:
                    self._down_since = (time.monotonic(), batch[0].step)
                    log.warning("the MLflow tracking server at %s stopped answering at step %d; training goes on "
                                "and its metrics wait here until it is back", self.uri, batch[0].step)
                if self._give_up.wait(RETRY_SECONDS):
                    return
                continue
            self._drop(batch)
            if self._down_since is not None:
                log.warning("the MLflow tracking server at %s is back after %.0f s: the metrics since step %d were "
                            "logged", self.uri, time.monotonic() - self._down_since[0], self._down_since[1])
                self._down_since = None

    def _drop(self, batch: list[_Item], lost: bool = False) -> None:
        with self._wake:
            for _ in batch:
                if self._queue:  # close() may have given up on them meanwhile
                    item = self._queue.popleft()
                    self.lost += [item] if lost else []

    def close(self, grace: float = 20.0) -> int:
        """Send what is queued, waiting ``grace`` seconds at most (a few when the server is down already); say
        once what could not be sent.

        Returns:
            The number of values lost.
        """
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(grace if self._down_since is None else 2 * RETRY_SECONDS + 1)  # a last try or two
        self._give_up.set()
        with self._wake:
            self.lost += list(self._queue)
            self._queue.clear()
        if self.lost:
            steps = sorted({i.step for i in self.lost})
            log.warning("MLflow run %s lost %d metric values of %d steps (%d to %d): the tracking server at %s "
                        "did not take them; the training and its checkpoints are complete",
                        self.run_id, sum(i.values for i in self.lost), len(steps), steps[0], steps[-1], self.uri)
        return sum(i.values for i in self.lost)
