"""The KFP train step's RayJob launcher (loomcfm_core/kube.py) against the KubeRay CRD schema and a Kubernetes
API stand-in served over HTTP (no cluster can run here), and the train stage that waits on it."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest
import yaml

from loomcfm_core import kube, stages
from loomcfm_core.config import load_config
from loomcfm_core.results import TrainResult
from loomcfm_core.training.loop import run_uri_for
from loomcfm_core.training.summary import TrainSummary, write_summary

SHARED = Path(__file__).resolve().parents[3] / "shared"


def _rayjob_schema():
    crd = yaml.safe_load((SHARED / "schemas" / "kuberay" / "ray.io_rayjobs.yaml").read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def test_rayjob_matches_the_crd_schema():
    cfg = load_config("cifar10", ["storage.root=s3://bucket/loomcfm"])
    body = kube.build_rayjob(kube.load_template(), kube.job_name(), cfg.to_yaml(),
                             ["--dataset", "s3://bucket/loomcfm/datasets/cifar10-x", "--parent-run-id", "abc"],
                             "registry.example/loomcfm:9.9", shutdown_after=False)
    jsonschema.validate(body, _rayjob_schema())
    assert body["spec"]["entrypoint"].startswith("loomcfm train --set ray.address=auto")
    assert body["spec"]["entrypoint"].endswith("--dataset s3://bucket/loomcfm/datasets/cifar10-x --parent-run-id abc")
    head = body["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "LOOMCFM_CONFIG_YAML", "value": cfg.to_yaml()} in head["env"]
    assert [e["name"] for e in head["env"]].count("LOOMCFM_CONFIG_YAML") == 1
    assert all(c["image"] == "registry.example/loomcfm:9.9" for c in kube._containers(body))
    assert body["spec"]["shutdownAfterJobFinishes"] is False
    bad = dict(body, spec=dict(body["spec"], shutdownAfterJobFinishes="yes"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _rayjob_schema())


class FakeKubeAPI(BaseHTTPRequestHandler):
    """Enough of the Kubernetes API for RayJobs: create, get (status follows a script), delete."""

    script: list = []
    objects: dict = {}
    deleted: list = []
    refuse_create: int | None = None
    failing_gets = 0

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        cls = type(self)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if cls.refuse_create:
            return self._send(cls.refuse_create, {"kind": "Status", "message": "rayjobs is forbidden", "code": 403})
        assert self.path == "/apis/ray.io/v1/namespaces/ml/rayjobs", self.path
        cls.objects[body["metadata"]["name"]] = body
        self._send(201, body)

    def do_GET(self):
        cls = type(self)
        if cls.failing_gets:
            cls.failing_gets -= 1
            return self._send(503, {"kind": "Status", "message": "etcd leader changed", "code": 503})
        name = self.path.rsplit("/", 1)[-1]
        status = cls.script.pop(0) if len(cls.script) > 1 else cls.script[0]
        self._send(200, {**cls.objects[name], "status": status})

    def do_DELETE(self):
        type(self).deleted.append(self.path.rsplit("/", 1)[-1])
        self._send(200, {"kind": "Status", "status": "Success"})

    def log_message(self, *args):
        pass


@pytest.fixture()
def kube_api():
    handler = type("Handler", (FakeKubeAPI,), {"script": [], "objects": {}, "deleted": [], "refuse_create": None,
                                               "failing_gets": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, kube.custom_objects_api(host=f"http://127.0.0.1:{server.server_port}")
    server.shutdown()


def _body():
    return kube.build_rayjob(kube.load_template(), "loomcfm-train-test", "name: x", ["--dataset", "s3://b/d"], "img:1")


def test_launcher_waits_for_success_and_cleans_up(kube_api, caplog):
    handler, api = kube_api
    caplog.set_level("INFO")
    handler.script = [{}, {"jobDeploymentStatus": "Initializing"},
                      {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                      {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}]
    status = kube.run_rayjob(api, "ml", _body(), poll_seconds=0.01)
    assert status["jobStatus"] == "SUCCEEDED"
    assert handler.objects["loomcfm-train-test"]["spec"]["entrypoint"].endswith("--dataset s3://b/d")
    assert handler.deleted == ["loomcfm-train-test"]
    assert "job=RUNNING" in caplog.text and "deployment=Initializing" in caplog.text


def test_launcher_surfaces_the_failure_message(kube_api):
    handler, api = kube_api
    handler.script = [{"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                      {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED",
                       "message": "Job entrypoint command failed with exit code 1"}]
    with pytest.raises(kube.RayJobError, match="FAILED: Job entrypoint command failed with exit code 1"):
        kube.run_rayjob(api, "ml", _body(), poll_seconds=0.01)
    assert handler.deleted == ["loomcfm-train-test"]


def test_launcher_can_leave_the_cluster_and_times_out(kube_api):
    handler, api = kube_api
    handler.script = [{"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}]
    with pytest.raises(kube.RayJobError, match="did not finish within 0 s"):
        kube.run_rayjob(api, "ml", _body(), poll_seconds=0.01, timeout_seconds=0.05, delete_after=False)
    assert handler.deleted == []


def test_launcher_reports_a_refused_create(kube_api):
    handler, api = kube_api
    handler.refuse_create = 403
    with pytest.raises(kube.RayJobError, match="cannot create RayJob ml/loomcfm-train-test: 403"):
        kube.run_rayjob(api, "ml", _body(), poll_seconds=0.01)


def test_train_stage_on_kubernetes_reads_back_the_result(kube_api, tmp_path):
    handler, api = kube_api
    handler.script = [{"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}]
    cfg = load_config("digits", [f"storage.root={tmp_path}/store"])
    dataset_uri = f"{tmp_path}/store/datasets/digits-x"
    summary = TrainSummary(run_uri=run_uri_for(cfg, dataset_uri), dataset_uri=dataset_uri, step=7,
                           checkpoint_uri="s3://b/ckpt.pt", mlflow_run_id="run-1", table_hashes=["-"],
                           metrics={"train/loss": 0.5})
    expected = TrainResult(**vars(summary), model_version="3", model_alias="base")
    write_summary(summary)  # what the RayJob's `loomcfm train` commits when it finishes: training's summary,
    expected.commit_registration()  # then the model version it registered
    out = stages.train_on_kubernetes(cfg, dataset_uri, "parent-1", namespace="ml", poll_seconds=0.01, api=api)
    assert out == expected
    (created,) = handler.objects.values()
    assert created["spec"]["entrypoint"].endswith(f"--dataset {dataset_uri} --parent-run-id parent-1")
    head = created["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert next(e["value"] for e in head["env"] if e["name"] == "LOOMCFM_CONFIG_YAML") == cfg.to_yaml()


def test_launcher_rides_out_api_server_hiccups(kube_api, monkeypatch):
    handler, api = kube_api
    monkeypatch.setattr(kube.time, "sleep", lambda seconds: None)
    handler.failing_gets = 3
    handler.script = [{"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}]
    assert kube.run_rayjob(api, "ml", _body(), poll_seconds=0.01)["jobStatus"] == "SUCCEEDED"
    handler.failing_gets = kube.MAX_POLL_FAILURES + 1
    with pytest.raises(kube.RayJobError, match="cannot read RayJob ml/loomcfm-train-test .*503"):
        kube.run_rayjob(api, "ml", _body(), poll_seconds=0.01)


def test_launch_train_rejects_what_cannot_work(tmp_path):
    cfg = load_config("digits", [f"storage.root={tmp_path}/store"])
    with pytest.raises(ValueError, match=r"launcher=rayjob needs storage.root on shared storage \(s3://"):
        stages.launch_train(cfg, "s3://b/d", launcher="rayjob")
    with pytest.raises(ValueError, match="needs init_from"):
        stages.launch_train(cfg, "s3://b/d", pairs_uri="s3://b/pairs")
    with pytest.raises(ValueError, match="launcher must be"):
        stages.launch_train(cfg, "s3://b/d", launcher="slurm")
