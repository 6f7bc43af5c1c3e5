"""A KFP v2beta1 API server double on 127.0.0.1 for the endpoints ``kfp.Client`` (SDK 2.17.3) uses to upload
pipelines and versions, find them, and create experiments, runs and recurring runs; the real client talks
HTTP to it. It records every request and enforces the rules of the real API server, kubeflow/pipelines tag
2.17.0 (4a3592cb), ``backend/src/apiserver``:

- ``server/pipeline_upload_server.go`` ``uploadPipeline`` / ``uploadPipelineVersion``: multipart field
  ``uploadfile`` (else 400), query ``name`` / ``display_name`` / ``description`` / ``pipelineid``; a version
  needs the id of an existing pipeline (400); an existing pipeline name or an existing version name within
  the pipeline is 409 (``codes.AlreadyExists``); the first upload creates the pipeline and a version named like it.
- ``resource/resource_manager.go`` (510, 2165) with ``common/utils.go`` ``ValidatePipelineName``: the spec's
  ``pipelineInfo.name`` must match ``^[a-z0-9][a-z0-9-]{0,127}$`` (400).
- ``template/v2_template.go`` ``validatePipelineJobInputs``: every runtime parameter must be a root input of
  the version's spec, with the JSON kind of its type (STRING: a string, NUMBER_*: a number, LIST, STRUCT,
  BOOLEAN); required inputs without a default must be given (400).
- ``server/api_converter.go`` 2083-2097: a recurring run's ``max_concurrency`` is 1..10 and its cron is parsed by
  robfig/cron v1 ``Parse`` (5 or 6 fields, or a descriptor: ``@yearly`` ... ``@every <duration>``) (400).
- runs and recurring runs refer to an existing experiment and to a pipeline version of the named pipeline
  (``resource_manager.go`` ``CreateRun``/``CreateJob``); their ``service_account`` is stored as given.
"""

from __future__ import annotations

import email
import itertools
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import yaml

PIPELINE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,127}$")
DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
KINDS = {"STRING": str, "NUMBER_INTEGER": (int, float), "NUMBER_DOUBLE": (int, float), "BOOLEAN": bool,
         "LIST": list, "STRUCT": dict}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_cron(cron: str) -> None:
    """robfig/cron v1.2.0 ``Parse`` (parser.go): a descriptor, or 5 to 6 space-separated fields."""
    if cron.startswith("@"):
        if cron in DESCRIPTORS or re.fullmatch(r"@every ([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+", cron):
            return
        raise ApiError(400, f"Schedule cron is not a supported format: Unrecognized descriptor: {cron}")
    fields = cron.split()
    if not 5 <= len(fields) <= 6:
        raise ApiError(400, f"Schedule cron is not a supported format: Expected 5 to 6 fields, found {len(fields)}: "
                            f"{cron}")
    if not all(re.fullmatch(r"[0-9A-Za-z*?,/-]+", f) for f in fields):
        raise ApiError(400, f"Schedule cron is not a supported format: {cron}")


def check_inputs(spec: dict, parameters: dict) -> None:
    """``validatePipelineJobInputs``."""
    declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    for name, param in declared.items():
        if name not in parameters:
            if not param.get("isOptional") and "defaultValue" not in param:
                raise ApiError(400, f"parameter {name} is not optional, yet has neither default value nor user "
                                    "provided value")
            continue
        kind = KINDS[param["parameterType"]]
        value = parameters[name]
        if not isinstance(value, kind) or (kind != bool and isinstance(value, bool)):
            raise ApiError(400, f"input parameter {name} requires type {param['parameterType']}, but the input "
                                f"parameter is not of that value type")
    extra = sorted(set(parameters) - set(declared))
    if extra:
        raise ApiError(400, f"parameter(s) provided are not required by pipeline: {', '.join(extra)}")


def _equals_filter(query: dict) -> str | None:
    """The display name of an EQUALS predicate (the only filter the client sends here)."""
    if "filter" not in query:
        return None
    (predicate,) = json.loads(query["filter"][0])["predicates"]
    assert predicate["operation"] in (1, "EQUALS") and predicate["key"] in ("display_name", "name"), predicate
    return predicate.get("stringValue", predicate.get("string_value"))


class KfpApi:
    """The server's state and handlers; ``requests`` holds (method, path, query, body) of every call."""

    def __init__(self):
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict, object]] = []
        self._ids = (f"{n:08x}-0000-4000-8000-000000000000" for n in itertools.count(1))
        self._lock = threading.Lock()

    # -- uploads ---------------------------------------------------------------------------------------------
    def _spec(self, files: dict) -> tuple[dict, str]:
        if "uploadfile" not in files:
            raise ApiError(400, "Failed to read pipeline from file")
        filename, content = files["uploadfile"]
        try:
            spec = next(yaml.safe_load_all(content))
        except yaml.YAMLError:
            raise ApiError(400, "Failed to read a pipeline spec file") from None
        name = spec.get("pipelineInfo", {}).get("name", "")
        if not PIPELINE_NAME.match(name):
            raise ApiError(400, "pipeline's name must contain only lowercase alphanumeric characters or '-' and must "
                                "start with alphanumeric characters")
        return spec, filename.rsplit(".", 1)[0]

    def _version(self, pipeline_id: str, name: str, description: str, spec: dict) -> dict:
        if any(v["pipeline_id"] == pipeline_id and v["name"] == name for v in self.versions.values()):
            raise ApiError(409, "Failed to create a pipeline version: already exists")
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": next(self._ids), "name": name,
                   "display_name": name, "description": description, "pipeline_spec": spec}
        self.versions[version["pipeline_version_id"]] = version
        return version

    def upload(self, query: dict, files: dict) -> dict:
        spec, filename = self._spec(files)
        name = query.get("name", query.get("display_name", [filename]))[0]
        if any(p["name"] == name for p in self.pipelines.values()):
            raise ApiError(409, "Failed to create a pipeline and a pipeline version")
        pipeline = {"pipeline_id": next(self._ids), "name": name, "display_name": name,
                    "description": query.get("description", [""])[0], "namespace": ""}
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        self._version(pipeline["pipeline_id"], name, pipeline["description"], spec)
        return pipeline

    def upload_version(self, query: dict, files: dict) -> dict:
        spec, filename = self._spec(files)
        pipeline_id = query.get("pipelineid", [""])[0]
        if pipeline_id not in self.pipelines:
            raise ApiError(400, "Failed to create a pipeline version")
        name = query.get("name", query.get("display_name", [filename]))[0]
        return self._version(pipeline_id, name, query.get("description", [""])[0], spec)

    # -- runs ------------------------------------------------------------------------------------------------
    def _job(self, body: dict) -> dict:
        if body.get("experiment_id") not in self.experiments:
            raise ApiError(400, f"experiment {body.get('experiment_id')!r} not found")
        if not body.get("display_name"):
            raise ApiError(400, "the name is empty")
        reference, inline = body.get("pipeline_version_reference"), body.get("pipeline_spec")
        if bool(reference) == bool(inline):
            raise ApiError(400, "exactly one of pipeline_spec and pipeline_version_reference is required")
        spec = inline
        if reference:
            version = self.versions.get(reference.get("pipeline_version_id", ""))
            if version is None or version["pipeline_id"] != reference.get("pipeline_id"):
                raise ApiError(404, f"pipeline version {reference} not found")
            spec = version["pipeline_spec"]
        check_inputs(spec, body.get("runtime_config", {}).get("parameters", {}) or {})
        return body

    def create_run(self, body: dict) -> dict:
        run = {**self._job(body), "run_id": next(self._ids), "state": "PENDING"}
        self.runs[run["run_id"]] = run
        return run

    def create_recurring_run(self, body: dict) -> dict:
        job = self._job(body)
        if not 1 <= int(job.get("max_concurrency", 1)) <= 10:
            raise ApiError(400, "Max concurrency of a recurring run must be at least 1 and at most 10")
        trigger = job.get("trigger", {})
        if bool(trigger.get("cron_schedule")) == bool(trigger.get("periodic_schedule")):
            raise ApiError(400, "exactly one of cron_schedule and periodic_schedule is required")
        if trigger.get("cron_schedule"):
            check_cron(trigger["cron_schedule"]["cron"])
        made = {**job, "recurring_run_id": next(self._ids), "status": "ENABLED"}
        self.recurring_runs[made["recurring_run_id"]] = made
        return made

    def create_experiment(self, body: dict) -> dict:
        name = body.get("display_name", "")
        if not name:
            raise ApiError(400, "Experiment name is empty. Please specify a valid experiment name")
        if any(e["display_name"] == name for e in self.experiments.values()):
            raise ApiError(409, f"Failed to create a new experiment: {name} already exists")
        experiment = {"experiment_id": next(self._ids), "display_name": name, "namespace": body.get("namespace", ""),
                      "storage_state": "AVAILABLE"}
        self.experiments[experiment["experiment_id"]] = experiment
        return experiment

    # -- dispatch --------------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict, body, files: dict) -> dict:
        with self._lock:
            self.requests.append((method, path, query, body))
            name = _equals_filter(query)
            if (method, path) == ("GET", "/apis/v2beta1/healthz"):
                return {"multi_user": False}
            if (method, path) == ("GET", "/apis/v2beta1/pipelines"):
                found = [p for p in self.pipelines.values() if name is None or p["display_name"] == name]
                return {"pipelines": found, "total_size": len(found)} if found else {}
            match = re.fullmatch(r"/apis/v2beta1/pipelines/([^/]+)/versions", path)
            if method == "GET" and match:
                if match.group(1) not in self.pipelines:
                    raise ApiError(404, f"pipeline {match.group(1)} not found")
                found = [v for v in self.versions.values() if v["pipeline_id"] == match.group(1)
                         and (name is None or v["display_name"] == name)]
                return {"pipeline_versions": found, "total_size": len(found)} if found else {}
            if (method, path) == ("POST", "/apis/v2beta1/pipelines/upload"):
                return self.upload(query, files)
            if (method, path) == ("POST", "/apis/v2beta1/pipelines/upload_version"):
                return self.upload_version(query, files)
            if (method, path) == ("GET", "/apis/v2beta1/experiments"):
                found = [e for e in self.experiments.values() if name is None or e["display_name"] == name]
                return {"experiments": found, "total_size": len(found)} if found else {}
            if (method, path) == ("POST", "/apis/v2beta1/experiments"):
                return self.create_experiment(body)
            if (method, path) == ("POST", "/apis/v2beta1/runs"):
                return self.create_run(body)
            if (method, path) == ("POST", "/apis/v2beta1/recurringruns"):
                return self.create_recurring_run(body)
            raise ApiError(404, f"{method} {path}: not an endpoint of this double")


def serve(api: KfpApi) -> ThreadingHTTPServer:
    """Start the double on a free port of 127.0.0.1 in a thread; ``server.server_address`` says where."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _serve(self, method: str) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length) if length else b""
            body, files = None, {}
            kind = self.headers.get("Content-Type", "")
            if kind.startswith("multipart/form-data"):
                message = email.message_from_bytes(f"Content-Type: {kind}\r\n\r\n".encode() + raw)
                files = {part.get_param("name", header="content-disposition"): (part.get_filename(),
                                                                                 part.get_payload(decode=True))
                         for part in message.get_payload() if part.get_filename()}
            elif raw:
                body = json.loads(raw)
            try:
                self._reply(200, api.handle(method, url.path, parse_qs(url.query), body, files))
            except ApiError as exc:
                self._reply(exc.status, {"error": str(exc), "message": str(exc), "code": exc.status})

        def do_GET(self):  # noqa: N802 (http.server's names)
            self._serve("GET")

        def do_POST(self):  # noqa: N802
            self._serve("POST")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
