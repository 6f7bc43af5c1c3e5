"""A Kubernetes API server for what a RayJob involves, served over real HTTP on 127.0.0.1.

No cluster can run here, so this is built from the API server's own rules (k8s.io/apiserver and
k8s.io/apimachinery as of Kubernetes 1.33, and apiextensions-apiserver for custom resources):

* bookkeeping (``pkg/registry/generic/registry/store.go``): ``uid``, ``creationTimestamp``, ``generation`` (+1
  when anything outside ``metadata``/``status`` changes), one increasing ``resourceVersion``; an update whose
  ``resourceVersion`` is stale is a 409 ``Conflict``; ``create`` drops ``status`` when the resource has a
  status subresource (``customResourceStrategy.PrepareForCreate``) and PUT ``/status`` takes only ``status``;
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
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import jsonschema
import yaml

SCHEMAS = Path(__file__).resolve().parents[3] / "shared" / "schemas" / "kuberay"
# resource -> (API group, kind, has a status subresource)
RESOURCES = {"rayjobs": ("ray.io", "RayJob", True), "rayclusters": ("ray.io", "RayCluster", True),
             "jobs": ("batch", "Job", True), "pods": ("", "Pod", True), "services": ("", "Service", True)}
OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences", "uid",
               "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
               "deletionGracePeriodSeconds", "managedFields"}
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ROUTE = re.compile(r"^/(?:apis/(?P<group>[^/]+)/(?P<gv>[^/]+)|api/(?P<cv>v1))/namespaces/(?P<ns>[^/]+)/"
                    r"(?P<resource>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>status|log))?$")


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

    PHRASES = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed", 409: "Conflict", 422: "Invalid",
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
    group = RESOURCES[resource][0]
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

    def list(self, resource: str, namespace: str, selector: str = "") -> list[dict]:
        with self.lock:
            return [copy.deepcopy(o) for (r, ns, _), o in sorted(self.objects.items())
                    if r == resource and ns == namespace and selector_matches(selector, o["metadata"].get("labels", {}))]

    def create(self, resource: str, namespace: str, body: dict, strict: bool = False) -> tuple[dict, list[str]]:
        group, kind, has_status = RESOURCES[resource]
        body = copy.deepcopy(body)
        meta = body.setdefault("metadata", {})
        if meta.get("namespace", namespace) != namespace:
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
            for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
                meta.pop(field, None)
            meta.update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=rfc3339(), generation=1)
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
                group = RESOURCES[resource][0]
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
                    "details": {"name": name, "group": RESOURCES[resource][0], "kind": resource,
                                "uid": obj["metadata"]["uid"]}}

    def _remove(self, key: tuple[str, str, str]) -> None:
        """Remove an object, then (garbage collection) everything it owns, transitively."""
        gone = self.objects.pop(key)
        if key[0] == "pods":
            self.logs.pop((key[1], key[2]), None)
        uid = gone["metadata"]["uid"]
        for other, obj in list(self.objects.items()):
            if other in self.objects and any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences", [])):
                self._remove(other)

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

    def _handle(self) -> None:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        payload = json.loads(self.rfile.read(length)) if length else None
        try:
            route = _ROUTE.match(url.path)
            if route is None or route["resource"] not in RESOURCES:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource ({url.path})")
            resource, ns, name, sub = route["resource"], route["ns"], route["name"], route["sub"]
            verb = "list" if self.command == "GET" and name is None else VERBS[self.command]
            self.store.requests.append((verb, f"{resource}/{sub}" if sub else resource))
            if (code := self.store.take_fault()) is not None:
                headers = {"Retry-After": "1"} if code == 429 else {}
                raise ApiError(code, ApiError.PHRASES.get(code, "InternalError"),
                               "etcdserver: leader changed" if code >= 500 else "too many requests", headers=headers)
            self._route(verb, resource, ns, name, sub, query, payload)
        except ApiError as exc:
            self._send(exc.code, exc.body(), exc.headers)

    def _route(self, verb, resource, ns, name, sub, query, payload) -> None:
        store = self.store
        if verb == "list":
            items = store.list(resource, ns, query.get("labelSelector", ""))
            group, kind, _ = RESOURCES[resource]
            return self._send(200, {"apiVersion": f"{group}/v1" if group else "v1", "kind": f"{kind}List",
                                    "metadata": {"resourceVersion": str(store.version)}, "items": items})
        if verb == "get" and sub == "log":
            return self._send(200, store.read_log(ns, name, query), text=True)
        if verb == "get":
            return self._send(200, store.get(resource, ns, name))
        if verb == "create" and name is None:
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
            if RESOURCES[resource][0] == "ray.io" and sub != "status":
                admit(RESOURCES[resource][1], payload, query.get("fieldValidation") == "Strict",
                      store.get(resource, ns, name))
            return self._send(200, store.update(resource, ns, payload, status_only=sub == "status"))
        if verb == "delete" and name:
            return self._send(200, store.delete(resource, ns, name))
        raise ApiError(405, "MethodNotAllowed", f"{self.command} is not supported here")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle


class ApiServer:
    """The HTTP front of a :class:`Store`, on a free port of 127.0.0.1."""

    def __init__(self, store: Store | None = None):
        self.store = store or Store()
        handler = type("BoundHandler", (Handler,), {"store": self.store})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def kubeconfig(self, path: Path, namespace: str = "loomcfm") -> Path:
        """A kubeconfig for this server (no credentials: it has no authentication), as a laptop has one."""
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "sim",
            "clusters": [{"name": "sim", "cluster": {"server": self.url}}],
            "users": [{"name": "sim", "user": {}}],
            "contexts": [{"name": "sim", "context": {"cluster": "sim", "user": "sim", "namespace": namespace}}]}))
        return path
