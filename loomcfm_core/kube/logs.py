"""The Ray driver's output, copied from the RayJob's submitter pod into this process's log.

In ``K8sJobMode`` KubeRay runs a batch Job named like the RayJob whose pod ends with ``ray job logs --follow``
(``ray-operator/controllers/ray/common/job.go`` ``BuildJobSubmitCommand``, KubeRay v1.7.0): its log is the
driver's stdout and stderr, and the Job controller labels the pod ``job-name=<rayjob>``. A retry deletes that
Job and its pod within seconds (``rayjob_controller.go``, Retrying), so the lines are copied while the
attempt runs: each poll reads what arrived since the last one (``timestamps=true``, ``sinceSeconds``) and
logs the lines newer than the last one seen (of lines sharing the last timestamp, those not copied yet).
The pod reads need ``pods`` list and ``pods/log`` get (k8s/base/rbac.yaml); without them the training still
runs, only the copy is off.
"""

from __future__ import annotations

import collections
import logging
import math
import re
import time

from loomcfm_core.kube.client import REQUEST_TIMEOUT, KubeApi, describe, status_code

FIRST_READ_LINES = 1000  # an adopted, long-running job: start with its recent past, not days of log
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z (.*)$", re.S)
log = logging.getLogger("loomcfm_core.kube.driver")


def _split(line: str) -> tuple[str, str]:
    """``(sortable timestamp, text)`` of a ``timestamps=true`` log line (RFC3339Nano in UTC)."""
    match = _STAMP.match(line)
    if not match:
        return "", line
    return match.group(1) + (match.group(2) or "").ljust(9, "0"), match.group(3)


class DriverLog:
    """Copies new lines of ``<name>``'s submitter pods into the ``loomcfm_core.kube.driver`` log and keeps
    the last ``keep`` lines for an error message."""

    def __init__(self, api: KubeApi, name: str, keep: int = 60):
        self.api, self.name = api, name
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.seen: dict[str, tuple[str, int, float]] = {}  # pod -> (last timestamp, lines copied with it,
        # wall time of the last read)
        self.enabled = True

    def copy_new(self) -> None:
        """One round of reading; errors switch the copy off (403: no RBAC) or wait for the next round."""
        from kubernetes.client.exceptions import ApiException

        if not self.enabled:
            return
        try:
            pods = self.api.core.list_namespaced_pod(self.api.namespace, label_selector=f"job-name={self.name}",
                                                     _request_timeout=REQUEST_TIMEOUT).items
            for pod in sorted(pods, key=lambda p: str(p.metadata.creation_timestamp)):
                self._read(pod.metadata.name)
        except ApiException as exc:
            if status_code(exc) in (401, 403):
                self.enabled = False
                log.warning("not copying the driver log of RayJob %s: %s (the launcher needs pods list and "
                            "pods/log get in namespace %s)", self.name, describe(exc), self.api.namespace)
            else:
                log.debug("reading the driver log of %s failed: %s", self.name, describe(exc))
        except OSError as exc:
            log.debug("reading the driver log of %s failed: %s", self.name, exc)

    def _read(self, pod: str) -> None:
        from kubernetes.client.exceptions import ApiException

        last, at_last, read_at = self.seen.get(pod, ("", 0, 0.0))
        window = {"since_seconds": math.ceil(time.time() - read_at) + 10} if read_at else {
            "tail_lines": FIRST_READ_LINES}
        now = time.time()
        try:
            text = self.api.core.read_namespaced_pod_log(pod, self.api.namespace, timestamps=True,
                                                         _request_timeout=REQUEST_TIMEOUT, **window)
        except ApiException as exc:
            if status_code(exc) in (400, 404):  # not started yet, or already gone
                return
            raise
        newest, count, skip = last, at_last, at_last
        for raw in (text or "").splitlines():
            stamp, line = _split(raw)
            if stamp and stamp < last:
                continue
            if stamp and stamp == last and skip:  # lines can share a timestamp: skip only those already copied
                skip -= 1
                continue
            if stamp:
                newest, count = (newest, count + 1) if stamp == newest else (stamp, 1)
            self.lines.append(line)
            log.info("[%s] %s", self.name, line)
        self.seen[pod] = (newest, count, now)

    def tail(self) -> str:
        return "\n".join(self.lines)
