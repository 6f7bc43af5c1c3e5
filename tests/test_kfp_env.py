"""What a step learns from its KFP pod: the shared-settings check and the parent run found by KFP run id,
against the real MLflow server fixture (the tracking a cluster's steps use)."""

from __future__ import annotations

import uuid

import mlflow
import pytest

from loomcfm_core import kfp_env, stages
from loomcfm_core.config import Config, load_config_text
from loomcfm_core.errors import ConfigError


@pytest.fixture(autouse=True)
def _mlflow_state(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("KFP_POD_NAME", raising=False)
    monkeypatch.delenv("KFP_RUN_ID", raising=False)
    yield
    mlflow.set_tracking_uri(None)


def test_steps_find_their_pipelines_parent_run_by_kfp_run_id(mlflow_server, s3_bucket, monkeypatch):
    """(The storage is a real S3 store, moto: a stage run's holder record lives there, beside the data.)"""
    cfg = Config(name="digits", tracking={"uri": mlflow_server.url, "experiment": f"kfp-{uuid.uuid4().hex[:8]}"},
                 storage={"root": f"s3://{s3_bucket}/prefix"})
    assert kfp_env.pipeline_parent(cfg) is None, "outside a pipeline run there is no parent"
    monkeypatch.setenv("KFP_POD_NAME", "loomcfm-x-system-container-impl-1")  # a cluster-ready config passes
    parents = {}
    for run_id in ("run-a", "run-b"):
        monkeypatch.setenv("KFP_RUN_ID", run_id)
        parents[run_id] = stages.start_pipeline_run(cfg)
    for run_id, parent in parents.items():
        monkeypatch.setenv("KFP_RUN_ID", run_id)
        assert kfp_env.pipeline_parent(cfg) == parent
        assert mlflow.MlflowClient(mlflow_server.url).get_run(parent).data.tags["kfp.run_id"] == run_id
    monkeypatch.setenv("KFP_RUN_ID", "run-never-prepared")
    assert kfp_env.pipeline_parent(cfg) is None


def test_check_shared_only_in_a_kfp_pod(monkeypatch):
    local = load_config_text("digits")
    kfp_env.check_shared(local)  # a laptop, kfp.local: local folders are right
    monkeypatch.setenv("KFP_POD_NAME", "p")
    with pytest.raises(ConfigError, match=r"storage\.root='loomcfm-data'.*tracking\.uri=None"):
        kfp_env.check_shared(local)
    with pytest.raises(ConfigError, match=r"tracking\.uri='sqlite:///x.db'"):
        kfp_env.check_shared(load_config_text("digits", ["storage.root=s3://b/p", "tracking.uri=sqlite:///x.db"]))
    with pytest.raises(ConfigError, match=r"storage\.root='file:///shared'"):
        kfp_env.check_shared(load_config_text("digits", ["storage.root=file:///shared", "tracking.uri=http://m:5000"]))
    kfp_env.check_shared(load_config_text("cluster"))
