"""Events as the simulated controllers, scheduler and kubelet record them (core/v1 ``Event``, which is what
``kubectl describe`` and ``kubectl get events`` show and what the launcher lists).

The recorders aggregate a repeated event into one object with a growing ``count`` and ``lastTimestamp``
(k8s.io/client-go ``tools/record/events_cache.go`` ``EventCorrelator``: same source, object, type, reason and
message); the object's name is ``<involved name>.<hex>`` (``tools/record/event.go`` ``makeEvent``). KubeRay
v1.7.0 and the scheduler record through ``tools/events`` (events.k8s.io/v1), which the API server serves as
core/v1 Events as well: ``reason``, ``note`` -> ``message``, ``reportingController`` -> ``source.component``.
"""

from __future__ import annotations

import secrets

from tests.k8s.apiserver import ApiError, Store, rfc3339


def record(store: Store, obj: dict, kind: str, reason: str, message: str, component: str,
           type_: str = "Normal") -> None:
    """Record (or count again) an event about ``obj`` of ``kind``."""
    meta = obj["metadata"]
    namespace = meta.get("namespace", "default")
    with store.lock:
        for event in store.list("events", namespace, fields=f"involvedObject.uid={meta.get('uid', '')}"):
            if (event["reason"], event["message"], event["type"]) == (reason, message, type_):
                event["count"] += 1
                event["lastTimestamp"] = rfc3339()
                try:
                    store.update("events", namespace, event)
                except ApiError:
                    pass
                return
        store.create("events", namespace, {
            "apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}"},
            "involvedObject": {"kind": kind, "name": meta["name"], "namespace": namespace, "uid": meta.get("uid", "")},
            "reason": reason, "message": message, "type": type_, "count": 1, "source": {"component": component},
            "firstTimestamp": rfc3339(), "lastTimestamp": rfc3339()})


def of(store: Store, namespace: str, name: str) -> list[dict]:
    """The events about the object ``name``, oldest first."""
    return sorted(store.list("events", namespace, fields=f"involvedObject.name={name}"),
                  key=lambda e: e["firstTimestamp"])
