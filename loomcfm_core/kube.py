"""Launch the train stage as a KubeRay ``RayJob`` and wait for it, from inside a pipeline step.

The RayJob is the template shipped inside the package (``loomcfm_core/templates/train-rayjob.yaml``, of which
``k8s/jobs/train-rayjob.yaml`` is a tested byte copy), with a name, the config text and the ``--set``
overrides filled in, so a pipeline run and a ``kubectl apply`` train the same way. The launcher polls ``status.jobStatus``, logs
every change, raises with the job's own message when it fails, and deletes the RayJob (and so its
cluster) afterwards unless told to keep it for debugging.
"""

from __future__ import annotations

import copy
import logging
import re
import shlex
import time
import uuid
from importlib import resources

import yaml

from loomcfm_core.errors import RayJobError, UsageError

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
TEMPLATE = "train-rayjob.yaml"  # in the package loomcfm_core.templates
HEAD_CONTAINER = "ray-head"
CONFIG_ENV = "LOOMCFM_CONFIG_YAML"
TERMINAL_OK = {"SUCCEEDED"}
TERMINAL_FAILED = {"FAILED", "STOPPED"}
MAX_POLL_FAILURES = 10
log = logging.getLogger(__name__)


def load_template() -> dict:
    """The training RayJob as shipped with the package (wherever it is installed: the image, a laptop)."""
    return yaml.safe_load(resources.files("loomcfm_core.templates").joinpath(TEMPLATE).read_text())


def _containers(rayjob: dict) -> list[dict]:
    """Every container the RayJob runs: head, workers and the submitter that calls ``ray job submit``."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = [g["template"] for g in (cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", []))]
    if "submitterPodTemplate" in rayjob["spec"]:
        templates.append(rayjob["spec"]["submitterPodTemplate"])
    return [c for template in templates for c in template["spec"]["containers"]]


def job_name(prefix: str = "loomcfm-train") -> str:
    """A fresh DNS-1123 name: a retried pipeline step must not collide with its failed predecessor."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _template_args(entrypoint: str) -> list[str]:
    """The template's ``loomcfm train`` arguments minus ``--dataset``: the ``--set ray.*`` that match its
    worker group stay, so the RayJob's training fits the cluster it brings up."""
    tokens = shlex.split(entrypoint)
    if tokens[:2] != ["loomcfm", "train"]:
        raise RayJobError(f"template entrypoint must start with 'loomcfm train', got {entrypoint!r}")
    kept, rest = [], iter(tokens[2:])
    for token in rest:
        if token == "--dataset":
            next(rest, None)
        elif not token.startswith("--dataset="):
            kept.append(token)
    return kept


def build_rayjob(template: dict, name: str, config_yaml: str, args: list[str], image: str,
                 shutdown_after: bool = True) -> dict:
    """The template with this run's name, image, config text (env of the head, where the driver runs) and
    ``loomcfm train`` arguments (after the template's own, so the cluster-shape ``--set``s still apply)."""
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
        raise UsageError(f"RayJob name {name!r} is not a DNS-1123 label")
    job = copy.deepcopy(template)
    job["metadata"]["name"] = name
    job["metadata"].pop("namespace", None)
    job["spec"]["entrypoint"] = shlex.join(["loomcfm", "train", *_template_args(job["spec"]["entrypoint"]), *args])
    job["spec"]["shutdownAfterJobFinishes"] = shutdown_after
    for container in _containers(job):
        container["image"] = image
        if container["name"] == HEAD_CONTAINER:
            env = [e for e in container.get("env", []) if e["name"] != CONFIG_ENV]
            container["env"] = [*env, {"name": CONFIG_ENV, "value": config_yaml}]
    if not any(c["name"] == HEAD_CONTAINER for c in _containers(job)):
        raise RayJobError(f"template has no head container named {HEAD_CONTAINER!r}")
    return job


def custom_objects_api(host: str | None = None):
    """A client for the cluster: in-cluster credentials in a pod, else kubeconfig, else ``host``."""
    from kubernetes import client, config

    if host:
        configuration = client.Configuration()
        configuration.host = host
        return client.CustomObjectsApi(client.ApiClient(configuration))
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def run_rayjob(api, namespace: str, body: dict, poll_seconds: float = 10.0, timeout_seconds: float = 7 * 86400,
               delete_after: bool = True) -> dict:
    """Create the RayJob, wait for a terminal ``jobStatus``, and return its final status.

    Raises :class:`RayJobError` with KubeRay's message on FAILED/STOPPED or after ``timeout_seconds``.
    """
    from kubernetes.client.exceptions import ApiException

    name = body["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    except ApiException as exc:
        raise RayJobError(f"cannot create RayJob {namespace}/{name}: {exc.status} {exc.reason}: {exc.body}") from exc
    log.info("created RayJob %s/%s: %s", namespace, name, body["spec"]["entrypoint"])
    started, seen, failures = time.monotonic(), None, 0
    try:
        while True:
            try:
                status = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status") or {}
                failures = 0
            except ApiException as exc:  # an API-server hiccup must not end (and delete) a days-long training
                failures += 1
                if failures > MAX_POLL_FAILURES:
                    raise RayJobError(f"cannot read RayJob {namespace}/{name} ({failures} failures in a row): "
                                      f"{exc.status} {exc.reason}") from exc
                log.warning("reading RayJob %s failed (%s %s), retrying", name, exc.status, exc.reason)
                time.sleep(poll_seconds * min(2**failures, 30))
                continue
            job_status = status.get("jobStatus", "")
            current = (status.get("jobDeploymentStatus", ""), job_status, status.get("message", ""))
            if current != seen:
                log.info("RayJob %s: deployment=%s job=%s %s (%.0f s)", name, current[0] or "-", current[1] or "-",
                         current[2], time.monotonic() - started)
                seen = current
            if job_status in TERMINAL_OK:
                return status
            if job_status in TERMINAL_FAILED or status.get("jobDeploymentStatus") == "Failed":
                raise RayJobError(f"RayJob {namespace}/{name} {job_status or 'deployment failed'}: "
                                  f"{status.get('message') or status.get('reason') or 'no message'} "
                                  f"(kubectl -n {namespace} logs -l job-name={name})")
            if time.monotonic() - started > timeout_seconds:
                raise RayJobError(f"RayJob {namespace}/{name} did not finish within {timeout_seconds:.0f} s "
                                  f"(last status: {job_status or 'none'})")
            time.sleep(poll_seconds)
    finally:
        if delete_after:
            try:
                api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
                log.info("deleted RayJob %s/%s", namespace, name)
            except ApiException as exc:
                log.warning("could not delete RayJob %s/%s: %s %s", namespace, name, exc.status, exc.reason)
