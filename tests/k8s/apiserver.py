"""A Kubernetes API server for what a RayJob involves, served over real HTTP on 127.0.0.1.

No cluster can run here, so this is built from the API server's own rules (k8s.io/apiserver and
k8s.io/apimachinery as of Kubernetes 1.33, and apiextensions-apiserver for custom resources):

* bookkeeping (``pkg/registry/generic/registry/store.go``): ``uid``, ``creationTimestamp``, ``generation`` (+1
  when anything outside ``metadata``/``status`` changes), one increasing ``resourceVersion``; an update whose
  ``resourceVersion`` is stale is a 409 ``Conflict``; ``create`` drops ``status`` when the resource has a
  status subresource (``customResourceStrategy.PrepareForCreate``; a pod's is ``phase: Pending``,
  ``podStrategy.PrepareForCreate``) and PUT ``/status`` takes only ``status``;
* deletion with finalizers: DELETE sets ``deletionTimestamp`` and answers the object, which stays readable
  until an update removes the last finalizer; without finalizers DELETE answers a ``Status`` ``Success``
  (``finalizeDelete``, custom resources have ``ReturnDeletedObject=false``); creating a name that exists,
  terminating or not, is 409 ``AlreadyExists``; objects whose controller owner is gone are collected;
* errors are ``Status`` objects (``pkg/api/errors/errors.go``): 404 ``NotFound`` and 409 ``AlreadyExists``
  name the resource as ``rayjobs.ray.io "<name>"`` with ``details.kind`` the resource; 422 ``Invalid`` lists
  causes; 400 ``BadRequest`` for strict field validation (``fieldValidation=Strict``: unknown fields are an
  error; otherwise they are pruned with a ``Warning: 299`` header, as structural schemas are);
* custom resources are defaulted from their CRD's ``default:`` values and validated against its
  ``openAPIV3Schema`` (the files in ../shared/schemas/kuberay, KubeRay v1.7.0) plus the CRD's CEL rules
  (``x-kubernetes-validations``) written out by hand in :func:`cel_errors`;
* label selectors (``pkg/labels/selector.go``): ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a)``,
  ``k``, ``!k``, comma-separated;
* pod logs (``GET .../pods/<name>/log``): ``text/plain`` with ``timestamps`` (RFC3339Nano), ``sinceSeconds``,
  ``tailLines``, ``limitBytes``.

Fault injection stands in for a struggling control plane: :meth:`Store.fail_next` answers the next requests
with 5xx (or 429 with ``Retry-After``), and :meth:`Store.commit_then_fail` applies the next create and then
answers 504, as a real server can after its storage write. ``created`` counts creations per resource and
``requests`` keeps (verb, resource) for RBAC checks.
"""

from __future__ import annotations

import collections
import copy
import datetime
import functools
import json
import re
import threading
import random
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import jsonschema
import yaml

from tests.k8s.rbac import ADMIN, Request, User, authorize, forbidden

SCHEMAS = Path(__file__).resolve().parents[3] / "shared" / "schemas" / "kuberay"


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    kind: str
    namespaced: bool = True
    has_status: bool = True


# resource -> its API group, version, kind, scope and whether it has a status subresource
RESOURCES = {
    "rayjobs": Kind("ray.io", "v1", "RayJob"), "rayclusters": Kind("ray.io", "v1", "RayCluster"),
    "jobs": Kind("batch", "v1", "Job"), "pods": Kind("", "v1", "Pod"), "services": Kind("", "v1", "Service"),
    "events": Kind("", "v1", "Event", has_status=False), "secrets": Kind("", "v1", "Secret", has_status=False),
    "configmaps": Kind("", "v1", "ConfigMap", has_status=False),
    "serviceaccounts": Kind("", "v1", "ServiceAccount", has_status=False),
    "nodes": Kind("", "v1", "Node", namespaced=False), "namespaces": Kind("", "v1", "Namespace", namespaced=False),
    "deployments": Kind("apps", "v1", "Deployment"),
    "customresourcedefinitions": Kind("apiextensions.k8s.io", "v1", "CustomResourceDefinition", namespaced=False),
    "roles": Kind("rbac.authorization.k8s.io", "v1", "Role", has_status=False),
    "rolebindings": Kind("rbac.authorization.k8s.io", "v1", "RoleBinding", has_status=False),
    "clusterroles": Kind("rbac.authorization.k8s.io", "v1", "ClusterRole", namespaced=False, has_status=False),
    "clusterrolebindings": Kind("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", namespaced=False,
                                has_status=False),
    "selfsubjectaccessreviews": Kind("authorization.k8s.io", "v1", "SelfSubjectAccessReview", namespaced=False,
                                     has_status=False),
}
KINDS = {spec.kind: resource for resource, spec in RESOURCES.items()}
OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences", "uid",
               "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
               "deletionGracePeriodSeconds", "managedFields"}
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
SUBRESOURCES = ("status", "log", "exec", "finalizers")
RAND = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand: generateName's 5 characters


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def rfc3339(moment: datetime.datetime | None = None) -> str:
    return (moment or now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339nano(moment: datetime.datetime) -> str:
    """Go's time.RFC3339Nano: the fraction without trailing zeros."""
    fraction = f"{moment.microsecond:06d}000".rstrip("0")
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)


class ApiError(Exception):
    """An answer other than 2xx, as the ``Status`` object the API server sends."""

    PHRASES = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed", 409: "Conflict", 415: "UnsupportedMediaType",
               422: "Invalid",
               429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None, headers=None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}
        self.headers = headers or {}

    def body(self) -> dict:
        status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
                  "reason": self.reason, "code": self.code}
        return {**status, **({"details": self.details} if self.details else {})}


def not_found(resource: str, name: str) -> ApiError:
    group = RESOURCES[resource].group
    qualified = f"{resource}.{group}" if group else resource
    return ApiError(404, "NotFound", f'{qualified} "{name}" not found', {"name": name, "group": group, "kind": resource})


# ---- CRD schemas: pruning, defaulting, validation ----------------------------------------------------------

@functools.cache
def crd_schema(kind: str) -> dict:
    crd = yaml.load((SCHEMAS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=yaml.CSafeLoader)
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def prune(obj, schema: dict, path: str = "") -> list[str]:
    """Drop the fields a structural schema does not declare (in place); returns their paths."""
    unknown = []
    if isinstance(obj, dict) and schema.get("type") == "object" and not schema.get("x-kubernetes-preserve-unknown-fields"):
        properties, extra = schema.get("properties"), schema.get("additionalProperties")
        if path == ".metadata":
            properties = {k: {} for k in OBJECT_META}
        for key in list(obj):
            where = f"{path}.{key}"
            if properties is not None and key in properties:
                unknown += prune(obj[key], properties[key], where)
            elif isinstance(extra, dict):
                unknown += prune(obj[key], extra, where)
            elif properties is not None or extra is False:
                unknown.append(where.lstrip("."))
                del obj[key]
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            unknown += prune(item, schema["items"], f"{path}[{i}]")
    return unknown


def apply_defaults(obj, schema: dict) -> None:
    """Structural defaulting: a missing property with a ``default`` gets it, recursively."""
    if isinstance(obj, dict) and schema.get("type") == "object":
        for key, sub in (schema.get("properties") or {}).items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                apply_defaults(obj[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and not schema.get("properties"):
            for value in obj.values():
                apply_defaults(value, extra)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            apply_defaults(item, schema["items"])


def cel_errors(kind: str, obj: dict, old: dict | None) -> list[tuple[str, str]]:
    """The ``x-kubernetes-validations`` of the RayJob CRD (v1.7.0), as (field, message)."""
    if kind != "RayJob":
        return []
    errors, spec = [], obj.get("spec", {})
    strategy = spec.get("deletionStrategy")
    if isinstance(strategy, dict):
        legacy = "onSuccess" in strategy or "onFailure" in strategy
        if legacy and "deletionRules" in strategy:
            errors.append(("spec.deletionStrategy", "legacy policies (onSuccess/onFailure) and deletionRules cannot "
                           "be used together within the same deletionStrategy"))
        if not (("onSuccess" in strategy and "onFailure" in strategy) or "deletionRules" in strategy):
            errors.append(("spec.deletionStrategy", "deletionStrategy requires either BOTH onSuccess and onFailure, "
                           "OR the deletionRules field (cannot be empty)"))
        for i, rule in enumerate(strategy.get("deletionRules") or []):
            condition = rule.get("condition") if isinstance(rule, dict) else None
            if not isinstance(condition, dict):
                continue
            where = f"spec.deletionStrategy.deletionRules[{i}].condition"
            if "jobStatus" in condition and "jobDeploymentStatus" in condition:
                errors.append((where, "JobStatus and JobDeploymentStatus cannot be used together within the same "
                               "deletion condition."))
            if "jobStatus" not in condition and "jobDeploymentStatus" not in condition:
                errors.append((where, "the deletion condition requires either the JobStatus or the "
                               "JobDeploymentStatus field."))
    if "managedBy" in spec:
        if spec["managedBy"] not in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"):
            errors.append(("spec.managedBy", "the managedBy field value must be either 'ray.io/kuberay-operator' or "
                           "'kueue.x-k8s.io/multikueue'"))
        if old is not None and old.get("spec", {}).get("managedBy") != spec["managedBy"]:
            errors.append(("spec.managedBy", "the managedBy field is immutable"))
    return errors


def admit(kind: str, body: dict, strict: bool, old: dict | None = None) -> list[str]:
    """Prune, default and validate a custom resource as the API server does; returns the warnings."""
    schema = crd_schema(kind)
    unknown = prune(body, schema)
    name = body.get("metadata", {}).get("name", "")
    if unknown and strict:
        fields = ", ".join(f'unknown field "{u}"' for u in unknown)
        raise ApiError(400, "BadRequest", f"{kind}.ray.io \"{name}\" is invalid: strict decoding error: {fields}")
    apply_defaults(body, schema)
    causes = [(".".join(map(str, e.absolute_path)) or "<root>", e.message)
              for e in jsonschema.Draft7Validator(schema).iter_errors(body)]
    causes += cel_errors(kind, body, old)
    if causes:
        text = "; ".join(f"{field}: Invalid value: {message}" for field, message in causes)
        raise ApiError(422, "Invalid", f'{kind}.ray.io "{name}" is invalid: {text}',
                       {"name": name, "group": "ray.io", "kind": kind,
                        "causes": [{"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in causes]})
    return [f'299 - "unknown field \\"{u}\\""' for u in unknown]


# ---- label selectors ---------------------------------------------------------------------------------------

def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """``pkg/labels`` selector syntax; a malformed selector is a 400."""
    for term in re.split(r",(?![^()]*\))", selector.strip()) if selector.strip() else []:
        term = term.strip()
        if match := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", term):
            key, op, values = match.group(1), match.group(2), {v.strip() for v in match.group(3).split(",")}
            if (labels.get(key) in values) != (op == "in") or (op == "in" and key not in labels):
                return False
        elif match := re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)", term):
            key, op, value = match.groups()
            if (labels.get(key) == value) != (op != "!="):
                return False
        elif match := re.fullmatch(r"(!?)([\w./-]+)", term):
            if (match.group(2) in labels) == bool(match.group(1)):
                return False
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return True


def field_matches(selector: str, obj: dict) -> bool:
    """``fieldSelector``: ``path=value``, ``path==value``, ``path!=value`` terms over dotted paths such as
    ``involvedObject.name`` or ``status.phase`` (``pkg/fields/selector.go``); a missing field reads as ""."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        match = re.fullmatch(r"([\w.]+)\s*(==|=|!=)\s*(.*)", term)
        if match is None:
            raise ApiError(400, "BadRequest", f"invalid field selector: {term!r}")
        path, op, value = match.groups()
        current = obj
        for key in path.split("."):
            current = current.get(key, "") if isinstance(current, dict) else ""
        if (str(current) == value) != (op != "!="):
            return False
    return True


# ---- the store ---------------------------------------------------------------------------------------------

class Store:
    """Objects by (resource, namespace, name), shared by the HTTP front and the simulated controllers."""

    def __init__(self):
        self.lock = threading.RLock()
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.logs: dict[tuple[str, str], list[tuple[datetime.datetime, str]]] = collections.defaultdict(list)
        self.version = 0
        self.created: collections.Counter[str] = collections.Counter()
        self.requests: list[tuple[str, str]] = []
        self.denied: list[str] = []  # the message of every 403 sent
        self.tokens: dict[str, User] = {}  # bearer token -> user; no token: the cluster's admin
        self._faults: collections.deque[int] = collections.deque()
        self._commit_then_fail = 0

    def fail_next(self, count: int, code: int = 503) -> None:
        with self.lock:
            self._faults.extend([code] * count)

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def commit_then_fail(self, count: int = 1) -> None:
        with self.lock:
            self._commit_then_fail += count

    def take_fault(self) -> int | None:
        with self.lock:
            return self._faults.popleft() if self._faults else None

    def _bump(self, obj: dict) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)

    def get(self, resource: str, namespace: str, name: str) -> dict:
        with self.lock:
            obj = self.objects.get((resource, namespace, name))
            if obj is None:
                raise not_found(resource, name)
            return copy.deepcopy(obj)

    def list(self, resource: str, namespace: str | None, selector: str = "", fields: str = "") -> list[dict]:
        """Objects of ``resource`` in ``namespace`` (None: every namespace; "" for cluster-scoped ones)."""
        with self.lock:
            return [copy.deepcopy(o) for (r, ns, _), o in sorted(self.objects.items())
                    if r == resource and namespace in (None, ns)
                    and selector_matches(selector, o["metadata"].get("labels", {})) and field_matches(fields, o)]

    def apply(self, obj: dict) -> dict:
        """Create ``obj`` (a manifest: its kind names the resource, its namespace where), or replace it."""
        resource = KINDS[obj["kind"]]
        namespace = obj["metadata"].get("namespace", "") if RESOURCES[resource].namespaced else ""
        with self.lock:
            current = self.objects.get((resource, namespace, obj["metadata"]["name"]))
            if current is None:
                created = self.create(resource, namespace, obj)[0]
                if "status" in obj and RESOURCES[resource].has_status:
                    created = self.update(resource, namespace, {**created, "status": obj["status"]}, True)
                return created
            self.objects[(resource, namespace, obj["metadata"]["name"])] = {**copy.deepcopy(obj),
                                                                            "metadata": current["metadata"]}
            return copy.deepcopy(self.objects[(resource, namespace, obj["metadata"]["name"])])

    def authorize(self, user: User, req: Request) -> tuple[bool, str]:
        """The RBAC decision for ``user`` on ``req``, from the Roles and bindings stored here."""
        with self.lock:
            bindings = [o for (r, ns, _), o in sorted(self.objects.items()) if r == "clusterrolebindings"
                        or (r == "rolebindings" and ns == req.namespace)]

        def lookup(resource, namespace, name):
            return self.objects.get((resource, namespace, name))

        return authorize(user, req, bindings, lookup)

    def create(self, resource: str, namespace: str, body: dict, strict: bool = False) -> tuple[dict, list[str]]:
        spec = RESOURCES[resource]
        group, kind, has_status = spec.group, spec.kind, spec.has_status
        body = copy.deepcopy(body)
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):  # names.SimpleNameGenerator
            meta["name"] = meta["generateName"][:58] + "".join(random.choice(RAND) for _ in range(5))
        if spec.namespaced and meta.get("namespace", namespace) != namespace:
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                           "sent on the request")
        warnings = admit(kind, body, strict) if group == "ray.io" else []
        name = meta.get("name", "")
        if not DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
            raise ApiError(422, "Invalid", f'{kind}.{group or "core"} "{name}" is invalid: metadata.name: Invalid '
                           f"value: {name!r}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                           "characters, '-' or '.', and must start and end with an alphanumeric character")
        with self.lock:
            key = (resource, namespace, name)
            if key in self.objects:
                qualified = f"{resource}.{group}" if group else resource
                raise ApiError(409, "AlreadyExists", f'{qualified} "{name}" already exists',
                               {"name": name, "group": group, "kind": resource})
            if has_status:
                body.pop("status", None)
            if resource == "pods":  # pkg/registry/core/pod/strategy.go podStrategy.PrepareForCreate: a new pod
                body["status"] = {"phase": "Pending"}  # is Pending before a kubelet sees it (qosClass: not read)
            for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
                meta.pop(field, None)
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=rfc3339(), generation=1)
            if spec.namespaced:
                meta["namespace"] = namespace
            self._bump(body)
            self.objects[key] = body
            self.created[resource] += 1
            return copy.deepcopy(body), warnings

    def update(self, resource: str, namespace: str, body: dict, status_only: bool = False) -> dict:
        with self.lock:
            key = (resource, namespace, body["metadata"]["name"])
            current = self.objects.get(key)
            if current is None:
                raise not_found(resource, key[2])
            if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                group = RESOURCES[resource].group
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {resource}.{group} "{key[2]}": the '
                               "object has been modified; please apply your changes to the latest version and try "
                               "again", {"name": key[2], "group": group, "kind": resource})
            updated = copy.deepcopy(current)
            if status_only:
                updated["status"] = copy.deepcopy(body.get("status", {}))
            else:
                for field in ("labels", "annotations", "finalizers", "ownerReferences"):
                    if field in body["metadata"]:
                        updated["metadata"][field] = copy.deepcopy(body["metadata"][field])
                    else:
                        updated["metadata"].pop(field, None)
                if body.get("spec") != current.get("spec"):
                    updated["spec"] = copy.deepcopy(body.get("spec"))
                    updated["metadata"]["generation"] += 1
            self._bump(updated)
            self.objects[key] = updated
            if updated["metadata"].get("deletionTimestamp") and not updated["metadata"].get("finalizers"):
                self._remove(key)
            return copy.deepcopy(updated)

    def patch(self, resource: str, namespace: str, name: str, patch: dict) -> dict:
        """A JSON merge patch (RFC 7386: objects merge, ``null`` removes, anything else replaces) of an object's
        metadata and spec, as a PATCH with ``application/merge-patch+json``; a custom resource is validated
        again (``admit``)."""
        def merge(target, change):
            if not isinstance(change, dict):
                return copy.deepcopy(change)
            out = dict(target) if isinstance(target, dict) else {}
            for key, value in change.items():
                if value is None:
                    out.pop(key, None)
                else:
                    out[key] = merge(out.get(key), value)
            return out

        with self.lock:
            current = self.get(resource, namespace, name)
            patched = merge(current, {k: v for k, v in patch.items() if k != "status"})
            patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            spec = RESOURCES[resource]
            if spec.group == "ray.io":
                admit(spec.kind, patched, False, current)
            return self.update(resource, namespace, patched)

    def delete(self, resource: str, namespace: str, name: str) -> dict:
        with self.lock:
            key = (resource, namespace, name)
            obj = self.objects.get(key)
            if obj is None:
                raise not_found(resource, name)
            if obj["metadata"].get("finalizers"):
                if not obj["metadata"].get("deletionTimestamp"):
                    obj["metadata"].update(deletionTimestamp=rfc3339(), deletionGracePeriodSeconds=0)
                    obj["metadata"]["generation"] += 1
                    self._bump(obj)
                return copy.deepcopy(obj)
            self._remove(key)
            return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                    "details": {"name": name, "group": RESOURCES[resource].group, "kind": resource,
                                "uid": obj["metadata"]["uid"]}}

    def _remove(self, key: tuple[str, str, str]) -> None:
        """Remove an object, then (garbage collection) everything it owns, transitively."""
        gone = self.objects.pop(key)
        if key[0] == "pods":
            self.logs.pop((key[1], key[2]), None)
        uid = gone["metadata"]["uid"]
        for other, obj in list(self.objects.items()):  # background propagation: a dependent's finalizers run
            if other in self.objects and any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences", [])):
                self.delete(*other)

    def collect_garbage(self) -> list[tuple[str, str, str]]:
        """The garbage collector's sweep (kubernetes ``pkg/controller/garbagecollector``): an object all of whose
        owners are absent is deleted. An owner is looked up by uid where it can be: in the dependent's namespace
        for a namespaced kind (an owner in another namespace is therefore absent: cross-namespace owner
        references are disallowed by design), at cluster scope otherwise. Returns what it deleted."""
        with self.lock:
            doomed = []
            for (resource, namespace, name), obj in self.objects.items():
                refs = obj["metadata"].get("ownerReferences") or []
                if not refs or obj["metadata"].get("deletionTimestamp"):
                    continue
                present = []
                for ref in refs:
                    owner = KINDS.get(ref.get("kind", ""))
                    where = namespace if owner and RESOURCES[owner].namespaced else ""
                    found = self.objects.get((owner, where, ref.get("name", ""))) if owner else None
                    present.append(found is not None and found["metadata"]["uid"] == ref.get("uid"))
                if not any(present):
                    doomed.append((resource, namespace, name))
            for key in doomed:
                if key in self.objects:
                    self.delete(*key)
            return doomed

    def log(self, namespace: str, pod: str, text: str) -> None:
        """What a container wrote: the kubelet stores (and timestamps) it line by line."""
        with self.lock:
            if ("pods", namespace, pod) in self.objects:
                moment = now()
                self.logs[(namespace, pod)].extend((moment, line) for line in text.split("\n"))

    def read_log(self, namespace: str, pod: str, query: dict) -> str:
        with self.lock:
            if ("pods", namespace, pod) not in self.objects:
                raise not_found("pods", pod)
            lines = list(self.logs.get((namespace, pod), []))
        if "sinceSeconds" in query:
            since = now() - datetime.timedelta(seconds=int(query["sinceSeconds"]))
            lines = [(t, line) for t, line in lines if t >= since]
        if "tailLines" in query:
            lines = lines[-int(query["tailLines"]):] if int(query["tailLines"]) else []
        stamps = query.get("timestamps") in ("1", "t", "T", "TRUE", "true", "True")  # Go's strconv.ParseBool
        text = "".join(f"{rfc3339nano(t)} {line}\n" if stamps else f"{line}\n" for t, line in lines)
        return text[:int(query["limitBytes"])] if "limitBytes" in query else text


# ---- HTTP --------------------------------------------------------------------------------------------------

VERBS = {"GET": "get", "POST": "create", "PUT": "update", "DELETE": "delete", "PATCH": "patch"}


def route(path: str) -> tuple[str, str, str, str, str] | None:
    """(API group, resource, namespace, name, subresource) of a request path; None if it names no resource
    (``/api/v1/namespaces/<ns>`` is the namespace object itself, ``/api/v1/namespaces/<ns>/<res>/...`` in it)."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        return None
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3 or rest[0] not in RESOURCES or RESOURCES[rest[0]].group != group:
        return None
    if RESOURCES[rest[0]].namespaced != bool(namespace) and not (rest[0] in RESOURCES and len(rest) == 1
                                                                  and RESOURCES[rest[0]].namespaced):
        return None
    sub = rest[2] if len(rest) == 3 else ""
    if sub and sub not in SUBRESOURCES:
        return None
    return group, rest[0], namespace, rest[1] if len(rest) > 1 else "", sub


class Handler(BaseHTTPRequestHandler):
    store: Store

    def log_message(self, *args):
        pass

    def _send(self, code: int, body, headers: dict | None = None, text: bool = False) -> None:
        data = (body if text else json.dumps(body)).encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain" if text else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _user(self) -> User:
        """Bearer-token authentication (``pkg/authentication/request/bearertoken``); no token is the admin
        of a kubeconfig with a client certificate."""
        header = self.headers.get("Authorization", "")
        if not header:
            return ADMIN
        token = header.removeprefix("Bearer ").strip()
        if token not in self.store.tokens:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return self.store.tokens[token]

    def _handle(self) -> None:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        payload = json.loads(self.rfile.read(length)) if length else None
        try:
            user = self._user()
            found = route(url.path)
            if found is None:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource ({url.path})")
            group, resource, ns, name, sub = found
            verb = VERBS[self.command]
            if self.command == "GET" and not name:
                verb = "watch" if query.get("watch") in ("1", "true") else "list"
            elif self.command == "DELETE" and not name:
                verb = "deletecollection"
            req = Request(verb, group, resource, sub, ns, name)
            allowed, reason = self.store.authorize(user, req)
            if not allowed:
                message, details = forbidden(user, req, reason)
                self.store.denied.append(message)
                raise ApiError(403, "Forbidden", message, details)
            self.store.requests.append((verb, f"{resource}/{sub}" if sub else resource))
            if (code := self.store.take_fault()) is not None:
                headers = {"Retry-After": "1"} if code == 429 else {}
                raise ApiError(code, ApiError.PHRASES.get(code, "InternalError"),
                               "etcdserver: leader changed" if code >= 500 else "too many requests", headers=headers)
            if resource == "selfsubjectaccessreviews":
                return self._review(user, payload)
            self._route(verb, resource, ns, name, sub, query, payload)
        except ApiError as exc:
            self._send(exc.code, exc.body(), exc.headers)

    def _review(self, user: User, payload: dict) -> None:
        """``selfsubjectaccessreview/rest.go`` ``Create``: the requester's own RBAC decision, 201."""
        attrs = (payload.get("spec") or {}).get("resourceAttributes")
        if not attrs:
            raise ApiError(422, "Invalid", 'SelfSubjectAccessReview.authorization.k8s.io "" is invalid: '
                           "spec.resourceAttributes: Required value: exactly one of nonResourceAttributes or "
                           "resourceAttributes must be specified")
        req = Request(attrs.get("verb", ""), attrs.get("group", ""), attrs.get("resource", ""),
                      attrs.get("subresource", ""), attrs.get("namespace", ""), attrs.get("name", ""))
        allowed, reason = self.store.authorize(user, req)
        status = {"allowed": allowed, **({"reason": reason} if reason else {})}
        self._send(201, {**payload, "metadata": {}, "status": status})

    def _route(self, verb, resource, ns, name, sub, query, payload) -> None:
        store, spec = self.store, RESOURCES[resource]
        if verb == "list":
            items = store.list(resource, ns if spec.namespaced else "", query.get("labelSelector", ""),
                               query.get("fieldSelector", "")) if ns or not spec.namespaced else \
                store.list(resource, None, query.get("labelSelector", ""), query.get("fieldSelector", ""))
            return self._send(200, {"apiVersion": f"{spec.group}/{spec.version}" if spec.group else "v1",
                                    "kind": f"{spec.kind}List", "metadata": {"resourceVersion": str(store.version)},
                                    "items": items})
        if verb == "get" and sub == "log":
            return self._send(200, store.read_log(ns, name, query), text=True)
        if verb == "get":
            return self._send(200, store.get(resource, ns, name))
        if verb == "create" and not name:
            strict = query.get("fieldValidation") == "Strict"
            with store.lock:
                fail_after = store._commit_then_fail > 0 and resource == "rayjobs"
                store._commit_then_fail -= fail_after
            created, warnings = store.create(resource, ns, payload, strict)
            if fail_after:
                raise ApiError(504, "Timeout", "Timeout: request did not complete within requested timeout - "
                               "context deadline exceeded")
            return self._send(201, created, {"Warning": ", ".join(warnings)} if warnings else None)
        if verb == "update" and name:
            if spec.group == "ray.io" and sub != "status":
                admit(spec.kind, payload, query.get("fieldValidation") == "Strict", store.get(resource, ns, name))
            return self._send(200, store.update(resource, ns, payload, status_only=sub == "status"))
        if verb == "delete" and name:
            return self._send(200, store.delete(resource, ns, name))
        if verb == "patch" and name and not sub:
            kind = self.headers.get("Content-Type", "")
            if kind != "application/merge-patch+json":
                raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                               f"accepted media types include: application/json-patch+json, application/merge-patch"
                               f"+json, application/apply-patch+yaml (got {kind})")
            return self._send(200, store.patch(resource, ns, name, payload))
        raise ApiError(405, "MethodNotAllowed", f"{self.command} is not supported here")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle


class ApiServer:
    """The HTTP front of a :class:`Store`, on a free port of ``host`` (127.0.0.1, or a bridge's address that
    pod hosts reach)."""

    def __init__(self, store: Store | None = None, host: str = "127.0.0.1"):
        self.store = store or Store()
        handler = type("BoundHandler", (Handler,), {"store": self.store})
        self.httpd = ThreadingHTTPServer((host, 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def kubeconfig(self, path: Path, namespace: str = "loomcfm", token: str | None = None) -> Path:
        """A kubeconfig for this server, as a laptop has one: the admin's (no token), or a ServiceAccount's
        bearer token registered in :attr:`Store.tokens`."""
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "sim",
            "clusters": [{"name": "sim", "cluster": {"server": self.url}}],
            "users": [{"name": "sim", "user": {"token": token} if token else {}}],
            "contexts": [{"name": "sim", "context": {"cluster": "sim", "user": "sim", "namespace": namespace}}]}))
        return path
