"""KubeRay's RayJob validation (the controller's, not the API server's), from its source.

KubeRay v1.7.0, ``ray-operator/controllers/ray/utils/validation.go``: ``ValidateRayJobMetadata``,
``ValidateRayJobSpec`` (in its order; the first error wins), ``validateDeletionConfiguration``,
``validateDeletionRules`` (its errors joined with newlines, as ``errors.Join``), ``validateDeletionCondition``,
``validateTTLConsistency``, ``validateLegacyDeletionPolicies``, the rules of ``ValidateRayClusterSpec`` that a
RayJob of ours can reach (containers, ``validateRayGroupResources``, replicas, ``validateRayGroupLabels``,
suspended worker groups), and ``ValidateRayJobStatus``. ``rayjob_controller.go`` ``validateRayJob`` runs them
on every reconcile and writes the message into ``status.message`` with ``jobDeploymentStatus:
ValidationFailed``. Messages are KubeRay's, word for word (the DNS-1035 one up to the list of errors).
"""

from __future__ import annotations

import re

import yaml

MAX_NAME = 47  # utils/constant.go MaxRayJobNameLength = MaxRayClusterNameLength (53) - 6
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
ORDER = ("DeleteWorkers", "DeleteCluster", "DeleteSelf")  # validateTTLConsistency's deletion order
SPEC = "The RayJob spec is invalid: "
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def validate_metadata(meta: dict) -> str | None:
    name = meta.get("name", "")
    if len(name) > MAX_NAME:
        return f"The RayJob metadata is invalid: RayJob name should be no more than {MAX_NAME} characters"
    if len(name) > 63 or not DNS1035.match(name):
        return ("The RayJob metadata is invalid: RayJob name should be a valid DNS1035 label: [a DNS-1035 label must "
                "consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end "
                "with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is "
                "'[a-z]([-a-z0-9]*[a-z0-9])?')]")
    return None


def _autoscaling(cluster: dict | None) -> bool:
    return bool(cluster and cluster.get("enableInTreeAutoscaling"))


def _ttl_consistency(policies: dict[str, int], kind: str, value: str) -> list[str]:
    errors, previous = [], None
    for policy in ORDER:
        if policy not in policies:
            continue
        if previous is not None and policies[policy] < previous[1]:
            errors.append(f"for {kind} '{value}': {policy} TTL ({policies[policy]}) must be >= {previous[0]} TTL "
                          f"({previous[1]})")
        previous = (policy, policies[policy])
    return errors


def _deletion_rules(spec: dict) -> str | None:
    selector = bool(spec.get("clusterSelector"))
    grouped: dict[tuple[str, str], dict[str, int]] = {}
    errors = []
    for i, rule in enumerate(spec["deletionStrategy"]["deletionRules"]):
        condition, policy = rule.get("condition", {}), rule.get("policy")
        has_job, has_deploy = "jobStatus" in condition, "jobDeploymentStatus" in condition
        if has_job and has_deploy:
            errors.append(f"deletionRules[{i}]: cannot set both JobStatus and JobDeploymentStatus at the same time")
            continue
        if not has_job and not has_deploy:
            errors.append(f"deletionRules[{i}]: exactly one of JobStatus and JobDeploymentStatus must be set")
            continue
        if condition.get("ttlSeconds", 0) < 0:
            errors.append(f"deletionRules[{i}]: TTLSeconds must be non-negative")
            continue
        if selector and policy in ("DeleteCluster", "DeleteWorkers"):
            errors.append(f"deletionRules[{i}]: DeletionPolicyType '{policy}' not supported when ClusterSelector is set")
            continue
        if _autoscaling(spec.get("rayClusterSpec")) and policy == "DeleteWorkers":
            errors.append(f"deletionRules[{i}]: DeletionPolicyType 'DeleteWorkers' not supported with autoscaling "
                          "enabled")
            continue
        kind = "JobStatus" if has_job else "JobDeploymentStatus"
        value = condition["jobStatus"] if has_job else condition["jobDeploymentStatus"]
        policies = grouped.setdefault((kind, value), {})
        if policy in policies:
            errors.append(f"deletionRules[{i}]: duplicate rule for DeletionPolicyType '{policy}' and {kind} '{value}'")
            continue
        policies[policy] = condition.get("ttlSeconds", 0)
    for (kind, value), policies in grouped.items():
        errors += _ttl_consistency(policies, kind, value)
    return "\n".join(errors) or None


def _legacy(spec: dict) -> str | None:
    strategy, selector = spec["deletionStrategy"], bool(spec.get("clusterSelector"))
    on_success, on_failure = strategy.get("onSuccess"), strategy.get("onFailure")
    if on_success is None or on_failure is None:
        return ("both DeletionStrategy.OnSuccess and DeletionStrategy.OnFailure must be set when using the legacy "
                "deletion policy fields of DeletionStrategy")
    for which, policy in (("OnSuccess", on_success), ("OnFailure", on_failure)):
        if policy.get("policy") is None:
            return (f"the DeletionPolicyType field of DeletionStrategy.{which} cannot be unset when DeletionStrategy "
                    "is enabled")
    success, failure = on_success["policy"], on_failure["policy"]
    if selector:
        for policy, when in ((success, "success"), (failure, "failure")):
            if policy in ("DeleteCluster", "DeleteWorkers"):
                return f"the ClusterSelector mode doesn't support DeletionStrategy={policy} on {when}"
    if "DeleteWorkers" in (success, failure) and _autoscaling(spec.get("rayClusterSpec")):
        return "DeletionStrategy=DeleteWorkers currently does not support RayCluster with autoscaling enabled"
    if spec.get("shutdownAfterJobFinishes") and "DeleteNone" in (success, failure):
        return SPEC + "shutdownAfterJobFinshes is set to 'true' while deletion policy is 'DeleteNone'"
    return None


def _deletion_configuration(spec: dict, gate: bool) -> str | None:
    """``validateDeletionConfiguration``."""
    shutdown, ttl = spec.get("shutdownAfterJobFinishes", False), spec.get("ttlSecondsAfterFinished", 0)
    if not shutdown and ttl > 0:
        return SPEC + "a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"
    strategy = spec.get("deletionStrategy")
    if strategy is None:
        return None
    if not gate:
        return "RayJobDeletionPolicy feature gate must be enabled to use DeletionStrategy"
    legacy = strategy.get("onSuccess") is not None or strategy.get("onFailure") is not None
    rules = bool(strategy.get("deletionRules"))
    if rules and shutdown:
        return SPEC + "spec.shutdownAfterJobFinishes and spec.deletionStrategy.deletionRules are mutually exclusive"
    if rules and legacy:
        return SPEC + "Cannot use both legacy onSuccess/onFailure fields and deletionRules simultaneously"
    if legacy:
        return _legacy(spec)
    if rules:
        return _deletion_rules(spec)
    return SPEC + ("DeletionStrategy requires either BOTH onSuccess and onFailure, OR the deletionRules field (cannot "
                   "be empty)")


def _cluster_spec(cluster: dict, gate: bool) -> str | None:
    """The reachable part of ``ValidateRayClusterSpec``."""
    head = cluster["headGroupSpec"]
    if not head["template"]["spec"].get("containers"):
        return "headGroupSpec should have at least one container"
    groups = [("Head", head)] + [(g.get("groupName", ""), g) for g in cluster.get("workerGroupSpecs", [])]
    for name, group in groups:
        if name != "Head":
            if not group["template"]["spec"].get("containers"):
                return "workerGroupSpec should have at least one container"
            low, high = group.get("minReplicas"), group.get("maxReplicas")
            if not _autoscaling(cluster) and (low is None or high is None):
                return f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled"
            if low is not None and low < 0:
                return f"worker group {name} has negative minReplicas {low}"
            if high is not None and high < 0:
                return f"worker group {name} has negative maxReplicas {high}"
            if low is not None and high is not None and low > high:
                return f"worker group {name} has minReplicas {low} greater than maxReplicas {high}"
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            return (f"resource fields should not be set in both rayStartParams and Resources for {name} group; please "
                    f"use only one")
        if "labels" in params:
            return (f"rayStartParams['labels'] is not supported for {name} group; please use the top-level Labels "
                    f"field instead")
        for key, value in (group.get("labels") or {}).items():
            if not _LABEL_NAME.match(key.rpartition("/")[2]):
                return f"invalid label key for {name} group: '{key}'"
            if value and not _LABEL_NAME.match(value):
                return f"invalid label value for key '{key}' in {name} group: '{value}'"
    if not gate and any(g.get("suspend") for g in cluster.get("workerGroupSpecs", [])):
        suspended = next(g for g in cluster["workerGroupSpecs"] if g.get("suspend"))
        return (f"worker group {suspended['groupName']} can be suspended only when the RayJobDeletionPolicy feature "
                "gate is enabled")
    return None


def validate_spec(spec: dict, gate: bool = True) -> str | None:
    """``ValidateRayJobSpec``, in order."""
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        return SPEC + "a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended"
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        return SPEC + "TTLSecondsAfterFinished must be a non-negative integer"
    if error := _deletion_configuration(spec, gate):
        return error
    selector, mode, backoff = spec.get("clusterSelector") or {}, spec.get("submissionMode"), spec.get("backoffLimit")
    if spec.get("suspend") and selector:
        return SPEC + "the ClusterSelector mode doesn't support the suspend operation"
    if spec.get("rayClusterSpec") is None and not selector:
        return SPEC + "one of RayClusterSpec or ClusterSelector must be set"
    if selector:
        if not selector.get("ray.io/cluster"):
            return "cluster name in ClusterSelector should not be empty"
        if mode == "SidecarMode":
            return "ClusterSelector is not supported in SidecarMode"
        if backoff is not None and backoff > 0:
            return SPEC + "BackoffLimit is incompatible with ClusterSelector mode"
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        return SPEC + "BackoffLimit is incompatible with InteractiveMode"
    if mode == "SidecarMode":
        if spec.get("submitterPodTemplate") is not None:
            return "Currently, SidecarMode doesn't support SubmitterPodTemplate"
        if spec.get("submitterConfig") is not None:
            return "Currently, SidecarMode doesn't support SubmitterConfig"
    if spec.get("rayClusterSpec") is not None:
        if (spec["rayClusterSpec"].get("authOptions") or {}).get("enableK8sTokenAuth"):
            return SPEC + "K8s token auth mode is currently not supported for RayJob"
        if error := _cluster_spec(spec["rayClusterSpec"], gate):
            return SPEC + error
    runtime_env = spec.get("runtimeEnvYAML", "")
    if runtime_env:
        try:
            if not isinstance(yaml.safe_load(runtime_env), (dict, type(None))):
                raise yaml.YAMLError("not a map")
        except yaml.YAMLError as exc:
            return f"failed to unmarshal RuntimeEnvYAML: {runtime_env}: {exc}"
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        return SPEC + "activeDeadlineSeconds must be a positive integer"
    if spec.get("preRunningDeadlineSeconds") is not None and spec["preRunningDeadlineSeconds"] <= 0:
        return SPEC + "preRunningDeadlineSeconds must be a positive integer"
    if backoff is not None and backoff < 0:
        return SPEC + "backoffLimit must be a positive integer"
    return None


def validate_rayjob(rayjob: dict, gate: bool = True) -> str | None:
    """``validateRayJob``: metadata, spec, status; the first error's message, or None."""
    status = rayjob.get("status") or {}
    if status.get("jobDeploymentStatus") == "Waiting" and rayjob["spec"].get("submissionMode") != "InteractiveMode":
        status_error = ("The RayJob status is invalid: JobDeploymentStatus cannot be `Waiting` when SubmissionMode is "
                        "not InteractiveMode")
    else:
        status_error = None
    return validate_metadata(rayjob["metadata"]) or validate_spec(rayjob["spec"], gate) or status_error
