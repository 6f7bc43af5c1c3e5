"""RayJobs for the tests of the KubeRay test doubles: ours as the launcher builds it, with parts of its spec
changed, and deletion rules."""

from __future__ import annotations

import copy

from loomcfm_core.config import load_config
from loomcfm_core.kube.rayjob import RunIdentity, build_rayjob, load_template


def with_spec(body: dict, **spec) -> dict:
    """A copy of ``body`` with these spec fields set (None: removed)."""
    changed = copy.deepcopy(body)
    for key, value in spec.items():
        if value is None:
            changed["spec"].pop(key, None)
        else:
            changed["spec"][key] = value
    return changed


def rayjob(*overrides: str, **spec) -> dict:
    """The training RayJob of a digits run with these config ``overrides``, then these ``spec`` fields."""
    cfg = load_config("digits", ["storage.root=s3://b/x", *overrides])
    body = build_rayjob(load_template(), cfg, RunIdentity("s3://b/x/runs/r"), ["--dataset", "s3://b/d"])
    return with_spec(body, **spec)


def rule(policy: str, ttl: int = 0, **condition: str) -> dict:
    """A ``deletionRules`` item."""
    return {"policy": policy, "condition": {**condition, "ttlSeconds": ttl}}
