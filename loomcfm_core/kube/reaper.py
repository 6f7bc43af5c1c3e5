"""RayJobs nobody watches any more, deleted: what a terminated KFP run or a killed launcher leaves.

Terminating a KFP run patches the Workflow's ``activeDeadlineSeconds`` to 0; Argo then signals PID 1 of the
step's containers (``argoexec kill 15 1``), the emissary forwards SIGTERM to the step's process group, and the
KFP launcher dies of it at once, taking the container with it about a second later (research-issue20.md §3;
argo-workflows v4.0.5 ``workflow/controller/exec_control.go``, ``cmd/argoexec/commands/emissary.go``,
kubeflow/pipelines 2.17.0 ``backend/src/v2/component/launcher_v2.go``). The step's own SIGTERM handler
deletes its RayJob first (:mod:`loomcfm_core.kube.launcher`), but a pod that is Pending, a failed exec, or a
SIGKILL deliver nothing, and the pod object stays until the Workflow is garbage-collected (7 days by default).
So every RayJob a KFP step starts carries the step pod's ``namespace/name`` and uid
(:func:`loomcfm_core.kube.rayjob.watched_by`), and this reaper, which every pipeline's check step runs, deletes a
RayJob that has not ended while its step pod is gone, is another pod (same name, other uid) or has ended;
not one whose ``kube.on_terminate`` is ``leave`` (left on purpose for a retried step, which, adopting it, names
itself the RayJob's watcher: :mod:`loomcfm_core.kube.launcher`).

It also deletes a ``kube.keep_cluster`` RayJob whose Ray job was STOPPED: KubeRay's deletion rules cannot match
STOPPED (the CRD's ``condition.jobStatus`` enum is SUCCEEDED and FAILED), so its cluster would stay forever.
"""

from __future__ import annotations

import logging

from loomcfm_core.kube.client import GROUP, PLURAL, REQUEST_TIMEOUT, VERSION, KubeApi, describe, status_code
from loomcfm_core.kube.platform import ON_TERMINATE, OWNER_POD, OWNER_UID
from loomcfm_core.kube.status import Observation

log = logging.getLogger(__name__)


def _orphaned(api: KubeApi, job: dict) -> str | None:
    """Why nobody watches ``job`` any more, or None."""
    from kubernetes.client.exceptions import ApiException

    notes, status = job["metadata"].get("annotations") or {}, job.get("status") or {}
    obs = Observation.of(status)
    if obs.ended:
        stopped_and_kept = obs.deployment == "Complete" and obs.job == "STOPPED" and \
            (job["spec"].get("deletionStrategy") or {}).get("deletionRules")
        return "its Ray job was stopped and no deletion rule can remove its cluster" if stopped_and_kept else None
    if OWNER_POD not in notes or notes.get(ON_TERMINATE) == "leave":
        return None
    namespace, _, name = notes[OWNER_POD].partition("/")
    try:
        pod = api.core.read_namespaced_pod(name, namespace, _request_timeout=REQUEST_TIMEOUT)
    except ApiException as exc:
        if status_code(exc) == 404:
            return f"its step pod {notes[OWNER_POD]} is gone"
        log.warning("cannot tell whether RayJob %s is watched: %s", job["metadata"]["name"], describe(exc))
        return None
    if pod.metadata.uid != notes.get(OWNER_UID):
        return f"its step pod {notes[OWNER_POD]} is another pod now"
    if pod.status.phase in ("Succeeded", "Failed"):
        return f"its step pod {notes[OWNER_POD]} ended ({pod.status.phase})"
    return None


def reap(api: KubeApi) -> list[str]:
    """Delete the orphaned RayJobs of ``api.namespace``; one line per RayJob deleted (or not deletable)."""
    from kubernetes.client.exceptions import ApiException

    jobs = api.custom.list_namespaced_custom_object(GROUP, VERSION, api.namespace, PLURAL,
                                                    _request_timeout=REQUEST_TIMEOUT).get("items", [])
    done = []
    for job in jobs:
        name = job["metadata"]["name"]
        if job["metadata"].get("deletionTimestamp") or (why := _orphaned(api, job)) is None:
            continue
        try:
            api.delete(name)
            done.append(f"deleted RayJob {api.namespace}/{name}: {why}")
        except ApiException as exc:
            if status_code(exc) != 404:
                done.append(f"could not delete RayJob {api.namespace}/{name} ({why}): {describe(exc)}")
    for line in done:
        log.warning("%s", line)
    return done
