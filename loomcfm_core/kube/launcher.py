"""Run one training RayJob to its end, from a KFP step or a laptop.

The launcher creates the RayJob, or adopts the one an earlier try of the same step left (same name, same
``loomcfm.io/run-key`` label), follows ``jobDeploymentStatus`` through KubeRay's retries
(:mod:`loomcfm_core.kube.status`), copies the driver's log into its own (:mod:`loomcfm_core.kube.logs`) and
ends with the RayJob's final status or a :class:`RayJobError` carrying KubeRay's reason, message, the
attempts made and the ``kubectl`` commands that show more.

Its own time bound follows from the RayJob's deadlines, which KubeRay applies per attempt (``startTime`` is
reset at every New -> Initializing, ``rayjob_controller.go`` ``initRayJobStatusIfNeed``, KubeRay v1.7.0):
attempts x ``activeDeadlineSeconds`` plus a teardown allowance per retry and a margin.

A successful RayJob is deleted (unless ``kube.keep_cluster``); a failed one stays, so the ``kubectl`` commands
of the error show its events and its submitter's log (its cluster is already gone: ``ttlSecondsAfterFinished``
0, :mod:`loomcfm_core.kube.rayjob`), until a retry of the step replaces it.

While the Ray job is not running yet, the launcher also reads the pods below the RayJob
(:mod:`loomcfm_core.kube.pods`), logs their progress and ends the step with one line naming the pod, the
cause and the ``kubectl`` command to see more once a cause that waiting cannot fix (an image that does not
pull, a missing Secret or key, a crash loop) has lasted ``kube.fail_fast_s``; the RayJob is then deleted or
left per ``kube.on_terminate``.

SIGTERM (KFP terminating the run, the step's pod evicted) stops the watch. With ``kube.on_terminate=delete``
the handler itself deletes the RayJob first, over a connection of its own (KubeRay's finalizer stops the Ray
job and the cluster goes with it): a terminated KFP step's process has about a second before the container
dies with its PID 1 (loomcfm_core/kube/reaper.py says why, and what catches the cases no signal reaches);
``leave`` keeps it for the retried step to adopt.

A ``kube.keep_cluster`` RayJob whose Ray job was stopped is deleted: no KubeRay deletion rule can match
STOPPED, so its cluster would otherwise stay.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

from loomcfm_core.errors import RayJobError
from loomcfm_core.kube.client import KubeApi, Patience, describe, reason, status_code
from loomcfm_core.kube.logs import DriverLog
from loomcfm_core.kube.pods import PROGRESS_S, Cause, PodWatch
from loomcfm_core.kube.platform import ON_TERMINATE, OWNER_POD, OWNER_UID
from loomcfm_core.kube.rayjob import RUN_KEY_LABEL
from loomcfm_core.kube.settings import KubeConfig
from loomcfm_core.kube.status import Observation, Progress

TEARDOWN_S = 300.0  # per retry: KubeRay deletes the old cluster and submitter before the next attempt starts
MARGIN_S = 600.0  # the submitter finishing, KubeRay's 3 s requeues, API hiccups
MESSAGE_CHARS = 2000
STARTED_JOB = ("RUNNING", "STOPPED", "SUCCEEDED", "FAILED")  # a Ray job that got past its submission
# what usually makes KubeRay's dashboard checks fail (rayjob_controller.go checkJobStatusCheckTimeoutAndUpdateStatusIfNeeded)
STATUS_CHECK_HINT = ("KubeRay's operator could not reach the head's dashboard (port 8265) for its status checks: usually a "
                     "NetworkPolicy or a service mesh (an Istio/Linkerd sidecar) between the operator's namespace and "
                     "this one; allow ingress to port 8265 of the RayJob's head pods from the operator")
log = logging.getLogger(__name__)


def time_bound(kube: KubeConfig, teardown_s: float = TEARDOWN_S, margin_s: float = MARGIN_S) -> float:
    """The longest a RayJob with these settings can take before KubeRay ends it, plus a margin."""
    return kube.attempts * kube.active_deadline_s + kube.backoff_limit * teardown_s + margin_s


@contextmanager
def sigterm_sets(stop: threading.Event, first: Callable[[], None] | None = None) -> Iterator[None]:
    """While inside, SIGTERM runs ``first`` (once) and sets ``stop`` instead of killing the process (whose
    ``finally`` blocks would not run). Signal handlers belong to the main thread; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame) -> None:
        if first is not None and not stop.is_set():
            stop.set()
            first()
        stop.set()

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _clip(message: str, limit: int = MESSAGE_CHARS) -> str:
    """The first line (what failed) and the end (the driver's last words) of a long KubeRay message."""
    if len(message) <= limit:
        return message
    head, _, _ = message.partition("\n")
    return f"{head[:300]}\n[...]\n{message[-(limit - min(len(head), 300)):]}"


class Launcher:
    """One RayJob's launch and watch; see the module docstring. The keyword arguments tune the waits."""

    def __init__(self, api: KubeApi, kube: KubeConfig, patience_s: float = 300.0, retry_base_s: float = 1.0,
                 teardown_s: float = TEARDOWN_S, margin_s: float = MARGIN_S, gone_wait_s: float = 300.0,
                 progress_s: float = PROGRESS_S):
        self.api, self.kube, self.progress_s = api, kube, progress_s
        self.stop = threading.Event()
        self.patience = Patience(patience_s, self.stop, base_s=retry_base_s)
        self.bound = time_bound(kube, teardown_s, margin_s)
        self.teardown_s, self.margin_s, self.gone_wait_s = teardown_s, margin_s, gone_wait_s
        self.deleted_on_signal = False

    def where(self, name: str) -> str:
        return f"{self.api.namespace}/{name}"

    def run(self, body: dict) -> dict:
        """Create or adopt ``body``'s RayJob and wait for its end; returns its final ``status``."""
        name, ended = body["metadata"]["name"], None
        with sigterm_sets(self.stop, first=lambda: self._delete_on_signal(name)):
            try:
                ended = self._run(body)
            except KeyboardInterrupt:
                self.stop.set()
            except RayJobError:
                if not self.stop.is_set():
                    raise
        if self.stop.is_set() or ended is None:
            self._terminated(name)
        obs, driver, status = ended
        if self.kube.keep_cluster and obs.deployment == "Complete" and obs.job == "STOPPED":
            self._delete(name, "its Ray job was stopped; KubeRay's deletion rules cannot match STOPPED, so "
                               "keep_cluster would leave its cluster forever")
        if obs.succeeded_run:
            if not self.kube.keep_cluster:
                self._delete(name, "it succeeded")
            return status
        raise self._failure(name, obs, driver)  # the RayJob stays for the kubectl commands the error names

    def _run(self, body: dict) -> tuple[Observation, DriverLog, dict] | None:
        name = body["metadata"]["name"]
        if self._create_or_adopt(body) is None:
            return None
        progress, driver = Progress(name, self.kube.attempts), DriverLog(self.api, name)
        pods = PodWatch(self.api, name, self.kube.fail_fast_s, self.progress_s)
        workers = body["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].get("replicas", 1)
        started = time.monotonic()
        while not self.stop.is_set():
            status = self._read(name)
            obs = Observation.of(status)
            progress.update(obs)
            driver.copy_new()
            if obs.ended:
                return obs, driver, status
            if obs.deployment in ("Initializing", "Running") and obs.job not in STARTED_JOB:
                if (cause := pods.check(obs.cluster, workers)) is not None:
                    self._cannot_start(name, cause)
            if time.monotonic() - started > self.bound:
                if not self.kube.keep_cluster:
                    self._delete(name, "the launcher's time bound passed")
                raise RayJobError(
                    f"RayJob {self.where(name)} did not end within {self.bound:.0f} s = {self.kube.attempts} "
                    f"attempt(s) x kube.active_deadline_s={self.kube.active_deadline_s} + {self.kube.backoff_limit} "
                    f"retries x {self.teardown_s:.0f} s + {self.margin_s:.0f} s; KubeRay should have ended it: is "
                    f"its operator running? (last state {obs.summary()})")
            self.stop.wait(self.kube.poll_s)
        return None

    def _read(self, name: str) -> dict:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.patience.call(f"read RayJob {self.where(name)}", self.api.get, name).get("status") or {}
        except ApiException as exc:
            if status_code(exc) == 404:
                raise RayJobError(f"RayJob {self.where(name)} was deleted while the launcher watched it") from exc
            raise RayJobError(f"cannot read RayJob {self.where(name)}: {describe(exc)}") from exc

    def _get_or_none(self, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.patience.call(f"read RayJob {self.where(name)}", self.api.get, name)
        except ApiException as exc:
            if status_code(exc) == 404:
                return None
            raise RayJobError(f"cannot read RayJob {self.where(name)}: {describe(exc)}") from exc

    def _create_or_adopt(self, body: dict) -> dict | None:
        """The RayJob to watch: a new one, or the one an earlier try of this step left. A finished successful
        one is adopted as it is; a failed one is replaced (this try is a new one, resuming from the latest
        checkpoint); an invalid one is adopted and fails at once; one being deleted is waited for."""
        from kubernetes.client.exceptions import ApiException

        name, key = body["metadata"]["name"], body["metadata"]["labels"][RUN_KEY_LABEL]
        while not self.stop.is_set():
            try:
                created = self.patience.call(f"create RayJob {self.where(name)}", self.api.create, body)
                log.info("created RayJob %s: %s", self.where(name), body["spec"]["entrypoint"])
                return created
            except ApiException as exc:
                if reason(exc) != "AlreadyExists":
                    raise RayJobError(f"cannot create RayJob {self.where(name)}: {describe(exc)}") from exc
            existing = self._get_or_none(name)
            if existing is None:
                continue  # it went between the create and the read
            theirs = existing["metadata"].get("labels", {}).get(RUN_KEY_LABEL)
            if theirs != key:
                raise RayJobError(f"RayJob {self.where(name)} exists but is not this run's ({RUN_KEY_LABEL}="
                                  f"{theirs!r}, expected {key!r}); delete it or change the run")
            obs = Observation.of(existing.get("status"))
            if existing["metadata"].get("deletionTimestamp"):
                log.info("RayJob %s is being deleted; waiting for it to go", self.where(name))
            elif obs.ended and not obs.succeeded_run and obs.deployment != "ValidationFailed":
                log.warning("RayJob %s of an earlier try ended %s; replacing it (the new one resumes from the "
                            "latest checkpoint)", self.where(name), obs.summary())
                self._delete(name, "an earlier try's RayJob failed")
            else:
                log.info("adopting RayJob %s (%s): an earlier try of this step created it", self.where(name),
                         obs.summary())
                self._watch_as(body, existing)
                return existing
            self._wait_gone(name)
        return None

    def _watch_as(self, body: dict, existing: dict) -> None:
        """Adopting: this step's pod becomes the RayJob's watcher (owner annotations and reference), so the
        reaper does not take the earlier try's ended pod for an orphan's."""
        from kubernetes.client.exceptions import ApiException

        mine, theirs = body["metadata"].get("annotations", {}), existing["metadata"].get("annotations", {})
        if OWNER_UID not in mine or mine.get(OWNER_UID) == theirs.get(OWNER_UID):
            return
        patch = {"metadata": {"annotations": {k: mine[k] for k in (OWNER_POD, OWNER_UID, ON_TERMINATE) if k in mine},
                              "ownerReferences": body["metadata"].get("ownerReferences")}}
        try:
            name = existing["metadata"]["name"]
            self.patience.call(f"patch RayJob {self.where(name)}", self.api.patch, name, patch)
        except ApiException as exc:
            log.warning("could not make this step the watcher of RayJob %s: %s", self.where(existing["metadata"][
                "name"]), describe(exc))

    def _wait_gone(self, name: str) -> None:
        deadline = time.monotonic() + self.gone_wait_s
        while not self.stop.is_set() and self._get_or_none(name) is not None:
            if time.monotonic() > deadline:
                raise RayJobError(f"RayJob {self.where(name)} is still being deleted after {self.gone_wait_s:.0f} "
                                  f"s: is KubeRay's operator running? (it removes the finalizer)")
            self.stop.wait(min(self.kube.poll_s, 2.0))

    def _delete(self, name: str, why: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            self.api.delete(name)
        except ApiException as exc:
            if status_code(exc) != 404:
                log.warning("could not delete RayJob %s: %s", self.where(name), describe(exc))
                return False
        except OSError as exc:
            log.warning("could not delete RayJob %s: %s", self.where(name), exc)
            return False
        log.info("deleted RayJob %s (%s)", self.where(name), why)
        return True

    def _delete_on_signal(self, name: str) -> None:
        """SIGTERM's first act with ``on_terminate=delete``: one short DELETE on a connection of its own."""
        if self.kube.on_terminate != "delete":
            return
        try:
            self.api.fresh().delete(name, timeout=(2, 3))
            self.deleted_on_signal = True
        except Exception:  # noqa: BLE001 - the main thread tries again with its own connection
            pass

    def _terminated(self, name: str) -> None:
        if self.kube.on_terminate == "delete":
            done = self.deleted_on_signal or self._delete(name, "the launcher was terminated")
            outcome = ("deleted it: KubeRay stops the Ray job and removes its cluster" if done else
                       f"could not delete it: kubectl -n {self.api.namespace} delete rayjob {name}")
        else:
            outcome = "left it running (kube.on_terminate=leave): a retried step of the same run adopts it"
        raise RayJobError(f"terminated while watching RayJob {self.where(name)}; {outcome}")

    def _cannot_start(self, name: str, cause: Cause) -> None:
        """A deterministic cause lasted ``kube.fail_fast_s``: one line, and the RayJob per ``on_terminate``."""
        ns = self.api.namespace
        if self.kube.on_terminate == "delete":
            done = self._delete(name, f"its {cause.role} pod cannot start")
            outcome = "deleted it" if done else f"could not delete it: kubectl -n {ns} delete rayjob {name}"
        else:
            outcome = "left it (kube.on_terminate=leave)"
        raise RayJobError(f"RayJob {self.where(name)} cannot start: {cause.line()} (for {self.kube.fail_fast_s} s, "
                          f"kube.fail_fast_s); see: {cause.kubectl(ns)}; {outcome}")

    def _failure(self, name: str, obs: Observation, driver: DriverLog) -> RayJobError:
        ns = self.api.namespace
        state = "was stopped" if obs.deployment == "Complete" else f"ended {obs.deployment}"
        lines = [f"RayJob {self.where(name)} {state} after {obs.attempt} of {self.kube.attempts} attempt(s) "
                 f"(kube.backoff_limit={self.kube.backoff_limit}): {obs.reason or obs.job or 'no reason given'}"]
        if obs.message:
            lines.append(_clip(obs.message))
        if obs.reason == "JobStatusCheckTimeoutExceeded":
            lines.append(STATUS_CHECK_HINT)
        tail = driver.tail()
        if tail and tail[-200:] not in obs.message:
            lines.append(f"driver log, last lines:\n{tail}")
        if self.kube.keep_cluster and obs.job == "STOPPED":
            lines.append("it is deleted with its cluster: no KubeRay deletion rule can keep a stopped job's head")
        elif self.kube.keep_cluster:
            lines.append(f"its head pod stays for kube.keep_cluster_s={self.kube.keep_cluster_s} s: kubectl -n {ns} "
                         f"logs -l ray.io/cluster={obs.cluster},ray.io/node-type=head")
        else:
            lines.append("its Ray cluster is gone (kube.keep_cluster=false); the RayJob and its submitter's log stay "
                         "until a retry of this step replaces it")
        lines.append(f"more: kubectl -n {ns} describe rayjob {name}; kubectl -n {ns} logs -l job-name={name} "
                     f"--tail=200")
        return RayJobError("\n".join(lines))


def run_rayjob(api: KubeApi, body: dict, kube: KubeConfig, **tuning: float) -> dict:
    """Launch ``body`` and wait for its end (see :class:`Launcher`); returns the RayJob's final status."""
    return Launcher(api, kube, **tuning).run(body)
