"""MLflow tracking against a real ``mlflow server`` (artifacts proxied to moto S3) and the local SQLite store."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import boto3
import mlflow
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from loomcfm_core.config import Config, load_config_text
from loomcfm_core.evaluation.summary import log_curves
from loomcfm_core.results import MethodResult
from loomcfm_core.run_record import CONFIG_ARTIFACT, config_params, log_config
from loomcfm_core.tracking import (STAGE_TAG, TrackingError, artifact_location, browse_lines, browse_text, experiment_id,
                                   start_run, tracking_uri)


@pytest.fixture(autouse=True)
def _mlflow_state(monkeypatch):
    """mlflow.set_tracking_uri is process-global and exports MLFLOW_TRACKING_URI; undo both after each test.

    Short HTTP retries/timeouts make a broken server fail a test in seconds, not MLflow's default minutes.
    """
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture()
def server_cfg(mlflow_server) -> Config:
    """A config tracking to the server, in an experiment of its own so tests do not see each other's runs."""
    return Config(name="digits", tracking={"uri": mlflow_server.url, "experiment": f"test-{uuid.uuid4().hex[:8]}"})


def _png(path, size=(6, 4)):
    Image.new("RGB", size, (200, 30, 90)).save(path)
    return path


def test_config_params_are_flat_strings_with_json_values():
    params = config_params(Config())
    assert params.keys() == {k for k in Config().flat() if not k.startswith("kube.")}
    assert params["data.source"] == "builtin:digits"
    assert params["model.channel_mult"] == "[1, 2]"
    assert params["train.max_steps"] == "null"
    assert params["train.bf16"] == "false"
    assert json.loads(params["eval.methods"]) == Config().eval.methods


def test_params_metrics_and_artifacts_reach_the_server_and_s3(server_cfg, mlflow_server, s3_env, tmp_path):
    png = _png(tmp_path / "grid.png")
    with start_run(server_cfg.tracking, server_cfg.experiment, "train") as run:
        log_config(server_cfg)
        for step, loss in enumerate([0.9, 0.5, 0.25]):
            mlflow.log_metrics({"train/loss": loss, "throughput/images_per_s": 100.0 + step}, step=step)
        mlflow.log_artifact(str(png), "samples")
    run_id = run.info.run_id

    client = MlflowClient(mlflow_server.url)
    stored = client.get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert stored.info.run_name == "train"
    assert stored.data.tags[STAGE_TAG] == "train"
    assert stored.data.params == config_params(server_cfg)
    assert client.get_experiment(stored.info.experiment_id).name == server_cfg.tracking.experiment
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.5), (2, 0.25)]

    assert sorted(a.path for a in client.list_artifacts(run_id)) == [CONFIG_ARTIFACT, "samples"]
    config_text = open(client.download_artifacts(run_id, CONFIG_ARTIFACT, str(tmp_path / "a"))).read()
    assert load_config_text(config_text) == server_cfg
    grid = client.download_artifacts(run_id, "samples/grid.png", str(tmp_path / "b"))
    assert open(grid, "rb").read() == png.read_bytes()

    # the server proxied the artifacts into its S3 bucket; the client needed no S3 credentials for that
    s3 = boto3.client("s3", endpoint_url=s3_env)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=mlflow_server.bucket, Prefix="mlartifacts/")["Contents"]]
    run_keys = {k.split(f"/{run_id}/artifacts/", 1)[1] for k in keys if f"/{run_id}/artifacts/" in k}
    assert run_keys == {CONFIG_ARTIFACT, "samples/grid.png"}
    body = s3.get_object(Bucket=mlflow_server.bucket,
                         Key=next(k for k in keys if k.endswith(f"{run_id}/artifacts/samples/grid.png")))["Body"]
    assert Image.open(io.BytesIO(body.read())).size == (6, 4)


@pytest.mark.process
def test_child_runs_name_their_parent_in_process_and_across_processes(server_cfg, mlflow_server):
    with start_run(server_cfg.tracking, server_cfg.experiment, "pipeline", tags={"kfp.run_id": "kfp-123"}) as parent:
        parent_id = parent.info.run_id
        with start_run(server_cfg.tracking, server_cfg.experiment, "cache", parent_run_id=parent_id) as child:
            in_process_id = child.info.run_id
        # a fresh process (as a Ray worker or KFP pod would be) has no active-run stack to nest under
        script = textwrap.dedent(f"""
            from loomcfm_core.config import load_config_text
            from loomcfm_core.tracking import start_run
            cfg = load_config_text({server_cfg.to_yaml()!r})
            with start_run(cfg.tracking, cfg.experiment, "train", parent_run_id={parent_id!r}) as run:
                print("RUN_ID=" + run.info.run_id)  # mlflow prints "View run ..." lines to stdout too
        """)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        other_process_id = done.stdout.split("RUN_ID=")[1].split()[0]

    client = MlflowClient(mlflow_server.url)
    assert client.get_run(parent_id).data.tags["kfp.run_id"] == "kfp-123"
    assert "mlflow.parentRunId" not in client.get_run(parent_id).data.tags
    for run_id, stage in [(in_process_id, "cache"), (other_process_id, "train")]:
        tags = client.get_run(run_id).data.tags
        assert tags["mlflow.parentRunId"] == parent_id
        assert tags[STAGE_TAG] == stage
    children = client.search_runs([experiment_id(server_cfg.tracking, server_cfg.experiment)],
                                  f"tags.mlflow.parentRunId = '{parent_id}'")
    assert {r.info.run_id for r in children} == {in_process_id, other_process_id}


def test_failing_stage_ends_its_run_failed(server_cfg, mlflow_server):
    with pytest.raises(ZeroDivisionError):
        with start_run(server_cfg.tracking, server_cfg.experiment, "train") as run:
            1 / 0
    assert MlflowClient(mlflow_server.url).get_run(run.info.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_a_worker_leaving_its_drivers_run_does_not_end_it(server_cfg, mlflow_server):
    """Ray stops a worker with SIGTERM (``SystemExit`` in Python) after its driver ended the run KILLED; the
    worker leaving (``attach``) must not make it FAILED, nor a worker that finishes make it FINISHED."""
    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(experiment_id(server_cfg.tracking, server_cfg.experiment)).info.run_id  # the driver's
    with start_run(server_cfg.tracking, server_cfg.experiment, "train", run_id=run_id, attach=True):
        mlflow.log_metric("loss", 1.0)
    assert client.get_run(run_id).info.status == "RUNNING", "the driver ends it, not a worker"
    with pytest.raises(SystemExit):
        with start_run(server_cfg.tracking, server_cfg.experiment, "train", run_id=run_id, attach=True):
            client.set_terminated(run_id, "KILLED")  # the driver, stopped by SIGTERM
            raise SystemExit(15)  # Ray's SIGTERM handler in the worker
    assert client.get_run(run_id).info.status == "KILLED"
    assert mlflow.active_run() is None


def test_default_local_sqlite_store_keeps_artifacts_under_local_dir(tmp_path):
    cfg = Config()
    local_dir = tmp_path / "loomcfm-runs"
    assert tracking_uri(cfg.tracking) == f"sqlite:///{local_dir}/mlflow.db"
    assert artifact_location(cfg.tracking) == (local_dir / "artifacts").as_uri()
    with start_run(cfg.tracking, cfg.experiment, "sample") as run:
        log_config(cfg)
        mlflow.log_metric("fid/euler-4", 12.5)
    with start_run(cfg.tracking, cfg.experiment, "eval"):  # second run: the experiment is found, not created again
        pass

    assert (local_dir / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri(cfg.tracking))
    experiment = client.get_experiment_by_name("loomcfm-digits")
    assert experiment.artifact_location == (local_dir / "artifacts").as_uri()
    assert len(client.search_runs([experiment.experiment_id])) == 2
    stored = client.get_run(run.info.run_id)
    assert stored.data.metrics == {"fid/euler-4": 12.5}
    assert stored.data.params["model.channel_mult"] == "[1, 2]"
    saved = local_dir / "artifacts" / run.info.run_id / "artifacts" / CONFIG_ARTIFACT
    assert load_config_text(saved.read_text()) == cfg
    assert not (tmp_path / "mlruns").exists()


def test_experiment_name_defaults_to_config_name():
    assert Config(name="cifar10").experiment == "loomcfm-cifar10"
    assert Config(name="cifar10", tracking={"experiment": "mine"}).experiment == "mine"


def test_deleted_experiment_is_a_clear_error():
    cfg = Config()
    MlflowClient(tracking_uri(cfg.tracking)).delete_experiment(experiment_id(cfg.tracking, cfg.experiment))
    with pytest.raises(TrackingError, match="'loomcfm-digits' .* is deleted"):
        with start_run(cfg.tracking, cfg.experiment, "train"):
            pass


def test_log_config_outside_a_run_is_an_error():
    with pytest.raises(TrackingError, match="active run"):
        log_config(Config())
    assert mlflow.active_run() is None


def test_the_printed_browse_command_works_as_printed_from_anywhere(tmp_path):
    """The `mlflow ui` line names this environment's mlflow by its absolute path: it runs from another folder
    with a PATH that does not have the venv (a shell that never activated it); the page opens the experiment
    in MLflow's model-training view."""
    cfg = Config(tracking={"local_dir": str(tmp_path / "runs")})
    command, page = browse_lines(tracking_uri(cfg.tracking), "7")
    argv = command.split()
    assert Path(argv[0]).is_absolute() and argv[1:] == ["ui", "--backend-store-uri", tracking_uri(cfg.tracking),
                                                         "--host", "127.0.0.1", "--port", "5000"]
    assert page == "then open http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    (tmp_path / "elsewhere").mkdir()
    done = subprocess.run([argv[0], "ui", "--help"], cwd=tmp_path / "elsewhere", capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=120)
    assert done.returncode == 0 and "--backend-store-uri" in done.stdout, done.stderr[-2000:]
    assert browse_lines("http://mlflow.loomcfm.svc:5000", "3") == \
        ["open http://mlflow.loomcfm.svc:5000/#/experiments/3/runs?workflowType=machine_learning"]


def test_a_new_experiment_opens_in_the_model_training_view_with_a_description():
    cfg = Config()
    experiment = MlflowClient(tracking_uri(cfg.tracking)).get_experiment(experiment_id(cfg.tracking, cfg.experiment))
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"].startswith("# loomcfm-digits\n")


def test_the_models_curves_are_overlaid_in_a_saved_view_that_the_printed_link_opens(server_cfg, mlflow_server):
    """MLflow generates one chart per metric key; a parent run's curves of base and reflow are overlaid, one
    chart per solver (x = NFE), in the experiment's saved view, in the envelope MLflow 3.17.2's UI decodes (the
    view was looked at in that UI through headless Chromium); the browse text links it; recording again
    rewrites that view rather than adding one."""
    eid = experiment_id(server_cfg.tracking, server_cfg.experiment)
    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(eid).info.run_id
    rows = [MethodResult("euler-2", 2.0, 5.0, 0.1), MethodResult("dopri5-1", 20.3, 3.0, 0.2)]
    for _ in range(2):
        log_curves(client, run_id, "fd_digits", {"base": rows, "reflow": rows})
    views = {k: v for k, v in client.get_experiment(eid).tags.items() if k.startswith("mlflow.sharedViewState.")}
    assert list(views) == ["mlflow.sharedViewState.loomcfm-fd_digits-base-vs-reflow"]
    envelope = json.loads(views.popitem()[1])
    assert envelope["name"] == "fd_digits vs NFE, base vs reflow" and {"createdAt", "updatedAt"} <= set(envelope)
    state = json.loads(envelope["state"])
    charts, (section,) = state["compareRunCharts"], state["compareRunSections"]
    assert [c["selectedMetricKeys"] for c in charts] == [["base/fd_digits/euler", "reflow/fd_digits/euler"],
                                                        ["base/fd_digits/dopri5", "reflow/fd_digits/dopri5"]]
    assert all(c["type"] == "LINE" and c["xAxisKey"] == "step" and c["metricSectionId"] == section["uuid"]
               for c in charts)
    assert [m.step for m in client.get_metric_history(run_id, "reflow/fd_digits/dopri5")] == [20, 20]
    link = (f"{mlflow_server.url}/#/experiments/{eid}/runs?compareRunsMode=CHART&"
            "viewStateShareKey=loomcfm-fd_digits-base-vs-reflow&workflowType=machine_learning")
    assert f"  fd_digits vs NFE, base vs reflow: {link}" in browse_text(server_cfg.tracking, server_cfg.experiment,
                                                                         run_id).splitlines()
