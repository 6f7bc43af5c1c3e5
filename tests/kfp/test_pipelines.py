"""Kubeflow Pipelines: compiled packages up to date, real kfp.local runs and early config errors."""

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from loomcfm_core import IMAGE
from loomcfm_core.cli import main
from loomcfm_core.config import ConfigError, load_config_text
from loomcfm_core.pipeline_summary import read_summary_table
from pipelines import runner
from pipelines.common import CLUSTER_PARAMETERS, TRAIN_RETRIES

TINY = ["train.max_steps=30", "reflow.max_steps=20", "reflow.num_pairs=256", "eval.num_samples=300",
        "eval.methods=[euler-1,euler-4]", "ray.cpus_per_worker=1", "model.attn_resolutions=[]"]


def test_compiled_packages_are_up_to_date(tmp_path):
    fresh = runner.compile_all(tmp_path)
    for path in fresh:
        committed = runner.COMPILED / path.name
        assert committed.is_file(), f"{committed} missing: run `loomcfm pipeline compile`"
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `loomcfm pipeline compile`"
    spec, platform = yaml.safe_load_all((runner.COMPILED / "loomcfm_pipeline.yaml").read_text())
    assert set(spec["root"]["inputDefinitions"]["parameters"]) >= {"config_yaml", "overrides", "launcher"}
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert all(e["secretAsEnv"][0]["keyToEnv"][0]["envVar"] == "AWS_ACCESS_KEY_ID" for e in executors.values())
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {IMAGE}
    assert "evaluate" in spec["root"]["dag"]["tasks"]["evaluate-2"]["dependentTasks"], \
        "the reflow evaluation records the summary with the base rows: it must wait for the base evaluation"


def test_train_steps_name_their_rayjob_pass_the_cluster_shape_and_are_retried():
    """Each train task gets the run id and its own task name as whole arguments (the KFP driver substitutes a
    placeholder only when it is the entire value), every cluster parameter of the pipeline, and a retry policy."""
    for path in runner.COMPILED.glob("*.yaml"):
        spec, _ = yaml.safe_load_all(path.read_text())
        root = spec["root"]["inputDefinitions"]["parameters"]
        assert set(CLUSTER_PARAMETERS) <= set(root), path.name
        trains = [t for t in spec["root"]["dag"]["tasks"].values() if t["componentRef"]["name"].startswith("comp-train")]
        assert len(trains) == (2 if path.name == "loomcfm_pipeline.yaml" else 1)
        for task in trains:
            params = task["inputs"]["parameters"]
            assert params["kfp_run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
            assert params["kfp_task"] == {"runtimeValue": {"constant": "{{$.pipeline_task_name}}"}}
            assert all(params[name] == {"componentInputParameter": name} for name in CLUSTER_PARAMETERS)
            assert task["retryPolicy"]["maxRetryCount"] == TRAIN_RETRIES >= 1
            assert not task["cachingOptions"].get("enableCache"), "training has side effects: never cached"


def test_the_train_component_turns_its_parameters_into_kube_settings():
    from loomcfm_core.config import load_config_text
    from loomcfm_core.kube.rayjob import cluster_config
    from loomcfm_core.kube.settings import as_overrides

    cfg = load_config_text("digits", as_overrides(namespace="team-a", keep_cluster=True, image="reg.corp/loomcfm:2",
                                                  ray_workers=4, gpus_per_worker="2", worker_cpu="8",
                                                  worker_memory="32Gi", gpu_node_selector=""))
    assert (cfg.kube.namespace, cfg.kube.image, cfg.kube.gpu_node_selector, cfg.kube.worker_cpu) == \
        ("team-a", "reg.corp/loomcfm:2", "", "8")
    ray = cluster_config(cfg).ray
    assert (ray.num_workers, ray.use_gpu, ray.cpus_per_worker) == (8, True, 4.0)
    with pytest.raises(ConfigError, match=r"kube.ray_workers"):
        load_config_text("digits", as_overrides(ray_workers=0))


def test_bad_overrides_fail_before_anything_runs(tmp_path, capfd):
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown config key"):
        runner.arguments("full", "digits", ["train.lrr=1"], None)
    with pytest.raises(ConfigError, match=r"train\.lr"):
        runner.arguments("full", "digits", ["train.lr=-1"], None)
    with pytest.raises(ValueError, match="--checkpoint"):
        runner.arguments("reflow", "digits", [], None)
    # inside the pipeline too (a run submitted from the UI): the first step fails, no stage starts
    with pytest.raises(RuntimeError):
        runner.run_local("full", {"config_yaml": "digits", "overrides": ["reflow.num_pairz=3"]}, str(tmp_path / "root"))
    output = re.sub(r"\x1b\[[0-9;]*m", "", "".join(capfd.readouterr()))
    assert "reflow.num_pairz: unknown config key" in output
    assert "Task 'prepare' finished with status FAILURE" in output and "Executing task 'cache'" not in output
    assert not (tmp_path / "loomcfm-data").exists() and not (tmp_path / "loomcfm-runs").exists()


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    """The full pipeline, then the reflow pipeline from its checkpoint with overrides, on kfp.local."""
    root = tmp_path_factory.mktemp("kfp")
    sets = [*TINY, f"storage.root={root}/store", f"tracking.local_dir={root}/runs"]
    cwd = os.getcwd()
    os.chdir(root)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # the full pipeline as `loomcfm pipeline run-local` runs it
            code = main(["pipeline", "run-local", "--pipeline-root", str(root / "full"),
                         *[arg for item in sets for arg in ("--set", item)]])
        assert code == 0
        model = json.loads(next((root / "full").glob("*/train/model")).read_text())
        reflow_sets = [*sets, "reflow.num_pairs=128", "reflow.method=euler-2", "reflow.max_steps=10"]
        runner.run_local("reflow", runner.arguments("reflow", "digits", reflow_sets, model["uri"]),
                         str(root / "reflow"))
    finally:
        os.chdir(cwd)
    return root, model, printed.getvalue()


def _outputs(root, pipeline, step):
    return json.loads(next((root / pipeline).glob(f"*/{step}/executor_output.json")).read_text())


def test_full_pipeline_steps_and_lineage(local_runs):
    root, model, _ = local_runs
    steps = {p.name for p in (root / "full").glob("*/*")}
    assert steps == {"prepare", "cache", "train", "evaluate", "pairs", "train-2", "evaluate-2"}
    assert model["uri"].endswith("step-00000030.pt") and Path(model["uri"]).is_file()
    dataset = json.loads(next((root / "full").glob("*/cache/dataset")).read_text())
    assert (Path(dataset["uri"]) / "manifest.json").is_file() and dataset["num_train"] == 1500
    metrics = _outputs(root, "full", "evaluate")["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert {"fd_digits/euler-1", "nfe/euler-4"} <= set(metrics)
    report = next((root / "full").glob("*/evaluate/report")).read_text()
    assert "| euler-4 | 4.0 |" in report


def test_mlflow_runs_of_the_pipelines(local_runs):
    root, _, printed = local_runs
    client = MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("loomcfm-digits").experiment_id])
    parents = [r for r in runs if r.data.tags.get("loomcfm.stage") == "pipeline"]
    assert len(parents) == 2 and all(r.data.tags.get("kfp.run_id") for r in parents)
    by_parent = {p.info.run_id: sorted(r.data.tags["loomcfm.stage"] for r in runs
                                       if r.data.tags.get("mlflow.parentRunId") == p.info.run_id) for p in parents}
    assert sorted(by_parent.values()) == [["cache", "evaluate", "evaluate_reflow", "pairs", "train", "train_reflow"],
                                          ["cache", "evaluate_reflow", "pairs", "train_reflow"]]
    full = next(p for p in parents if len(by_parent[p.info.run_id]) == 6)
    assert {"base/fd_digits/euler-1", "base/nfe/euler-4", "reflow/fd_digits/euler-4", "reflow/nfe/euler-1"} <= \
        set(full.data.metrics), "the parent run carries the summary (what the runs table compares)"
    table = read_summary_table(load_config_text("digits", [f"tracking.local_dir={root / 'runs'}"]), full.info.run_id)
    assert table.startswith("| method | NFE base | fd_digits base | NFE reflow | fd_digits reflow |")
    assert f"\n{table}\n" in printed, "run-local ends with the table `loomcfm run` prints"
    reflow_only = next(p for p in parents if p is not full)
    assert "| euler-4 | - | - |" in read_summary_table(load_config_text("digits", [f"tracking.local_dir={root / 'runs'}"]),
                                                          reflow_only.info.run_id), "no base model in that pipeline"


def test_reflow_pipeline_applied_its_overrides(local_runs):
    root, model, _ = local_runs
    pairs = json.loads(next((root / "reflow").glob("*/pairs/dataset")).read_text())
    assert pairs["num_pairs"] == 128 and pairs["method"] == "euler-2"
    trained = json.loads(next((root / "reflow").glob("*/train/model")).read_text())
    assert trained["uri"].endswith("step-00000010.pt") and trained["alias"] == "reflow"
