"""Whether an installed CRD can hold an object: every field it sets is declared in the CRD's
``openAPIV3Schema`` and every enum value is allowed.

An API server prunes what a structural schema does not declare (apiextensions-apiserver ``pkg/apiserver/
schema/pruning``) and our launcher creates with ``fieldValidation=Strict`` (a 400 naming the field), so a RayJob
that uses a field of a newer KubeRay than the one installed either fails at creation or, applied with
kubectl's default warning mode, silently loses it (e.g. ``deletionStrategy.deletionRules``, KubeRay >= 1.5).
The check reads the schema, not a version string, so a patched or back-ported CRD is judged by what it holds.
"""

from __future__ import annotations

from typing import Any

# metadata is ObjectMeta: the API server validates it, not the CRD's schema
SKIPPED = ("metadata", "apiVersion", "kind", "status")


def served_schema(crd: dict, version: str) -> dict | None:
    """The ``openAPIV3Schema`` of ``version`` if the CRD serves it, else None."""
    for entry in crd.get("spec", {}).get("versions", []):
        if entry.get("name") == version and entry.get("served"):
            return (entry.get("schema") or {}).get("openAPIV3Schema") or {}
    return None


def _unknown(value: Any, schema: dict, path: str, out: list[str]) -> None:
    if schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-int-or-string"):
        return
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}={value!r} (allowed: {', '.join(map(str, schema['enum']))})")
        return
    if isinstance(value, dict):
        properties, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, sub in value.items():
            where = f"{path}.{key}" if path else key
            if properties is not None and key in properties:
                _unknown(sub, properties[key], where, out)
            elif isinstance(extra, dict):
                _unknown(sub, extra, where, out)
            elif properties is not None or extra is False:
                out.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _unknown(item, schema["items"], f"{path}[{i}]", out)


def unsupported(obj: dict, schema: dict) -> list[str]:
    """The fields of ``obj`` (dotted paths) that ``schema`` does not declare, and enum values it refuses."""
    out: list[str] = []
    properties = schema.get("properties") or {}
    for key, value in obj.items():
        if key in SKIPPED:
            continue
        if key not in properties:
            out.append(key)
        else:
            _unknown(value, properties[key], key, out)
    return out
