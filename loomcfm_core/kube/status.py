"""A RayJob's ``status`` read the way KubeRay v1.7.0 writes it, and the log of its progress.

``jobDeploymentStatus`` is KubeRay's lifecycle (``ray-operator/apis/ray/v1/rayjob_types.go``); only
``Complete`` and ``Failed`` are terminal (``IsJobDeploymentTerminal``), and ``ValidationFailed`` is never
left again (``rayjob_controller.go`` ``Reconcile`` has no case for it), so it is a failure too. A failed
attempt that ``backoffLimit`` still allows is written as ``Retrying`` with ``jobStatus: FAILED``
(``checkBackoffLimitAndUpdateStatusIfNeeded``), then reset to New and started again on a new cluster with a
new ``jobId``: ``jobStatus == FAILED`` alone ends nothing, and since Retrying can pass between two reads, a
new attempt shows as ``failed`` growing or ``jobId`` changing. Success is ``Complete`` with
``jobStatus: SUCCEEDED``; ``Complete`` with ``STOPPED`` means someone stopped the Ray job. A suspended and
resumed RayJob (``Suspending``, ``Suspended``, New) also starts a new Ray job, without counting a failure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

FAILED_STATES = ("Failed", "ValidationFailed")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observation:
    """One read of ``status`` (absent keys are KubeRay's empty values: New, no attempt failed yet)."""

    deployment: str = ""
    job: str = ""
    reason: str = ""
    message: str = ""
    failed: int = 0
    succeeded: int = 0
    job_id: str = ""
    cluster: str = ""

    @classmethod
    def of(cls, status: dict | None) -> Observation:
        status = status or {}
        return cls(status.get("jobDeploymentStatus", ""), status.get("jobStatus", ""), status.get("reason", ""),
                   status.get("message", ""), int(status.get("failed") or 0), int(status.get("succeeded") or 0),
                   status.get("jobId", ""), status.get("rayClusterName", ""))

    @property
    def succeeded_run(self) -> bool:
        return self.deployment == "Complete" and self.job == "SUCCEEDED"

    @property
    def ended(self) -> bool:
        """Nothing will change any more: complete (success or stopped), failed for good, or invalid."""
        return self.deployment == "Complete" or self.deployment in FAILED_STATES

    @property
    def attempt(self) -> int:
        """The attempt running now, or the attempts made once it ended (``failed`` counts every failed one)."""
        if self.deployment in FAILED_STATES:
            return self.failed
        return self.failed + 1

    def summary(self) -> str:
        state = self.deployment or "New"
        detail = f" job={self.job}" if self.job else ""
        return state + detail + (f" reason={self.reason}" if self.reason else "")


def gist(text: str, limit: int = 300) -> str:
    """The first line of a KubeRay message (what failed) and, for a longer one, its last (often the why)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    short = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    return short if len(short) <= limit else short[:limit] + "..."


class Progress:
    """Logs each change of a RayJob's state, attempt and reason, with the attempt number and the time since
    the launcher started watching, and says when a new attempt began and why the previous one ended."""

    def __init__(self, name: str, attempts: int, clock=time.monotonic):
        self.name, self.attempts, self.clock = name, attempts, clock
        self.started = clock()
        self.last: Observation | None = None
        self.failure = ""  # reason and message of the latest failed attempt seen
        self.job = ("", 0)  # the latest Ray job id seen, and the failed count then: a new id with no new
        # failure is a suspended and resumed RayJob, not a retry

    def update(self, now: Observation) -> None:
        before = self.last
        if now.reason and now.deployment in ("Retrying", *FAILED_STATES):
            self.failure = f"{now.reason}: {gist(now.message)}"
        elapsed = self.clock() - self.started
        if before is not None and now.failed > before.failed and not now.ended:
            why = self.failure or "KubeRay retried between two reads: kubectl describe rayjob shows why"
            log.warning("RayJob %s: attempt %d/%d started after %.0f s; the previous one failed (%s)", self.name,
                        now.attempt, self.attempts, elapsed, why)
        if now.job_id and self.job[0] and now.job_id != self.job[0] and now.failed == self.job[1] and not now.ended:
            log.warning("RayJob %s: a new Ray job %s started after %.0f s (attempt %d/%d): the RayJob was suspended "
                        "and resumed", self.name, now.job_id, elapsed, now.attempt, self.attempts)
        if now.job_id:
            self.job = (now.job_id, now.failed)
        key = (now.deployment, now.job, now.failed, now.reason)
        if before is None or key != (before.deployment, before.job, before.failed, before.reason):
            log.info("RayJob %s: %s (attempt %d/%d, %.0f s)", self.name, now.summary(), max(now.attempt, 1),
                     self.attempts, elapsed)
        self.last = now
