"""Kubeflow Pipelines: compiled packages up to date, real kfp.local runs and early config errors."""

import contextlib
import io
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from loomcfm_core import IMAGE
from loomcfm_core.cli import main
from loomcfm_core.config import ConfigError, load_config_text
from loomcfm_core.evaluation.summary import read_summary_table
from pipelines import runner
from pipelines.common import CLUSTER_PARAMETERS, TRAIN_RETRIES

# Real kfp.local runs of whole pipelines (three in the module fixture): minutes on a loaded 2-core machine.
pytestmark = pytest.mark.timeout(2700)
# What the second full run logs under its parent: nothing. Its cached steps do not run, and its training steps
# find their finished training in the same run folder and log into that training's MLflow run (a child of
# the first parent) instead of starting another.
RERUN_CHILDREN = []
TINY = ["train.max_steps=6", "reflow.max_steps=4", "reflow.num_pairs=128", "eval.num_samples=64",
        "eval.methods=[euler-1,euler-4]", "ray.cpus_per_worker=1", "model.channels=32", "model.attn_resolutions=[]"]


def _without_comments(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#")]


def test_compiled_packages_are_up_to_date(tmp_path):
    fresh = runner.compile_all(tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in fresh} == \
        {p.relative_to(runner.COMPILED).as_posix() for p in runner.COMPILED.rglob("*.yaml")}, "a package too many"
    for path in fresh:
        committed = runner.COMPILED / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} missing: run `loomcfm pipeline compile`"
        # Everything but the compiler's comment header, which prints a list-of-dicts default (gpu_tolerations)
        # in an order that varies with the process's hash seed; the documents are compared whole.
        assert _without_comments(committed.read_text()) == _without_comments(path.read_text()), \
            f"{committed} is stale: run `loomcfm pipeline compile`"
        assert list(yaml.safe_load_all(committed.read_text())) == list(yaml.safe_load_all(path.read_text()))
    spec, platform = yaml.safe_load_all((runner.COMPILED / "loomcfm_pipeline.yaml").read_text())
    assert set(spec["root"]["inputDefinitions"]["parameters"]) >= {"config_yaml", "overrides", "namespace"}
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert all(e["secretAsEnv"][0]["keyToEnv"][0]["envVar"] == "AWS_ACCESS_KEY_ID" for e in executors.values())
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {IMAGE}
    assert "evaluate" in spec["root"]["dag"]["tasks"]["evaluate-reflow"]["dependentTasks"], \
        "the reflow evaluation records the summary with the base rows: it must wait for the base evaluation"


def test_train_steps_name_their_rayjob_pass_the_cluster_shape_and_are_retried():
    """Each train task gets the run id and its own task name as whole arguments (the KFP driver substitutes a
    placeholder only when it is the entire value), every cluster parameter of the pipeline, its package's
    launcher, and a retry policy. Every package starts with the cluster check, never cached."""
    checked = set()
    for path in runner.COMPILED.rglob("*.yaml"):
        spec, _ = yaml.safe_load_all(path.read_text())
        root, tasks = spec["root"]["inputDefinitions"]["parameters"], spec["root"]["dag"]["tasks"]
        check = tasks["cluster-check"]
        assert "dependentTasks" not in check and not check["cachingOptions"].get("enableCache"), path
        assert tasks["prepare"]["dependentTasks"] == ["cluster-check"], path
        launcher = "rayjob" if "rayjob" in path.parts else "local"
        assert check["inputs"]["parameters"]["launcher"] == {"runtimeValue": {"constant": launcher}}
        if "namespace" not in root:
            continue  # the ablation's arms train inside their own steps
        checked.add(path.relative_to(runner.COMPILED).as_posix())
        assert set(CLUSTER_PARAMETERS) <= set(root) and "launcher" not in root, path.name
        trains = [t for t in tasks.values() if t["componentRef"]["name"].startswith("comp-train")]
        assert len(trains) == (2 if path.name == "loomcfm_pipeline.yaml" else 1)
        for task in trains:
            params = task["inputs"]["parameters"]
            assert params["kfp_run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
            assert params["kfp_task"] == {"runtimeValue": {"constant": "{{$.pipeline_task_name}}"}}
            assert params["launcher"] == {"runtimeValue": {"constant": launcher}}
            assert all(params[name] == {"componentInputParameter": name} for name in CLUSTER_PARAMETERS)
            assert task["retryPolicy"]["maxRetryCount"] == TRAIN_RETRIES >= 1
            assert not task["cachingOptions"].get("enableCache"), "training has side effects: never cached"
    assert checked == {f"{platform}{launcher}{name}" for platform in ("", "gpu/") for launcher in ("", "rayjob/")
                       for name in ("loomcfm_pipeline.yaml", "reflow_pipeline.yaml")}


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


@pytest.mark.kfp_local
def test_bad_overrides_fail_before_anything_runs(tmp_path, capfd):
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown config key"):
        runner.arguments("full", "digits", ["train.lrr=1"], None)
    with pytest.raises(ConfigError, match=r"train\.lr"):
        runner.arguments("full", "digits", ["train.lr=-1"], None)
    with pytest.raises(ValueError, match="--checkpoint"):
        runner.arguments("reflow", "digits", [], None)
    # inside the pipeline too (a run submitted from the UI): the first step (the cluster check, which reads the
    # config for the RayJob it checks) fails, no stage starts
    with pytest.raises(RuntimeError):
        runner.run_local("full", {"config_yaml": "digits", "overrides": ["reflow.num_pairz=3"]}, str(tmp_path / "root"))
    output = re.sub(r"\x1b\[[0-9;]*m", "", "".join(capfd.readouterr()))
    assert "reflow.num_pairz: unknown config key" in output
    assert "Task 'cluster-check' finished with status FAILURE" in output and "Executing task 'prepare'" not in output
    assert not (tmp_path / "loomcfm-data").exists() and not (tmp_path / "loomcfm-runs").exists()


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory, digits_dataset):
    """The full pipeline twice with caching (the second run may reuse steps of the first), then the reflow
    pipeline from its checkpoint with overrides, on kfp.local; kfp.local's own log lines are kept. The digits
    dataset is cached in the store already: the cache steps run, and find it."""
    root = tmp_path_factory.mktemp("kfp")
    shutil.copytree(digits_dataset, root / "store" / "datasets" / digits_dataset.name)
    sets = [*TINY, f"storage.root={root}/store", f"tracking.local_dir={root}/runs"]
    cwd = os.getcwd()
    os.chdir(root)
    handler, root_logger = _Messages(), logging.getLogger()
    level = root_logger.level
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # the full pipeline as `loomcfm pipeline run-local` runs it
            code = main(["pipeline", "run-local", "--cache", "--pipeline-root", str(root / "full"),
                         *[arg for item in sets for arg in ("--set", item)]])
        assert code == 0
        # after the CLI's logging.basicConfig(force=True), which replaces the root logger's handlers
        root_logger.addHandler(handler)
        root_logger.setLevel(logging.INFO)  # kfp.local reports a cache hit with logging.info on the root logger
        runner.run_local("full", runner.arguments("full", "digits", sets, None), str(root / "full"), caching=True)
        second = handler.messages
        model = json.loads(_run_dirs(root, "full")[0].joinpath("train", "model").read_text())
        reflow_sets = [*sets, "reflow.num_pairs=160", "reflow.method=euler-2", "reflow.max_steps=3"]
        runner.run_local("reflow", runner.arguments("reflow", "digits", reflow_sets, model["uri"]),
                         str(root / "reflow"))
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(level)
        os.chdir(cwd)
    return root, model, second, printed.getvalue()


def _run_dirs(root, pipeline):
    """kfp.local's run folders under a pipeline root, oldest first."""
    return sorted((p for p in (root / pipeline).iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.stat().st_mtime)


def _outputs(root, pipeline, step):
    return json.loads((_run_dirs(root, pipeline)[0] / step / "executor_output.json").read_text())


@pytest.mark.ray
@pytest.mark.kfp_local
def test_full_pipeline_steps_and_lineage(local_runs):
    root, model, _, _ = local_runs
    steps = {p.name for p in _run_dirs(root, "full")[0].iterdir()}
    assert steps == {"cluster-check", "prepare", "cache", "train", "evaluate", "pairs", "train-2", "evaluate-reflow"}
    assert model["uri"].endswith("step-00000006.pt") and Path(model["uri"]).is_file()
    dataset = json.loads((_run_dirs(root, "full")[0] / "cache" / "dataset").read_text())
    assert (Path(dataset["uri"]) / "manifest.json").is_file() and dataset["num_train"] == 1500
    metrics = _outputs(root, "full", "evaluate")["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert {"fd_digits/euler-1", "nfe/euler-4"} <= set(metrics)
    report = (_run_dirs(root, "full")[0] / "evaluate" / "report").read_text()
    assert "| euler-4 | 4.0 |" in report


@pytest.mark.ray
@pytest.mark.kfp_local
def test_a_second_run_reuses_the_deterministic_steps(local_runs):
    """Same config, caching on: kfp.local finds cache, evaluate and pairs under the keys of the first run and
    skips them (sdk/local/orchestrator/task_executor.py logs the hit); prepare and training run again."""
    root, _, second, _ = local_runs
    hits = {m.split()[1] for m in second if " cache hit " in m}
    assert {"cache", "pairs", "evaluate"} <= hits, second
    assert not hits & {"prepare", "train", "train-2"}, hits
    first, again = _run_dirs(root, "full")
    assert not (again / "cache").exists() and (again / "prepare").is_dir() and (again / "train").is_dir()
    assert json.loads((again / "train" / "model").read_text())["uri"] == \
        json.loads((first / "train" / "model").read_text())["uri"]


@pytest.mark.ray
@pytest.mark.kfp_local
def test_mlflow_runs_of_the_pipelines(local_runs):
    root, _, _, printed = local_runs
    client = MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("loomcfm-digits").experiment_id])
    parents = [r for r in runs if r.data.tags.get("loomcfm.stage") == "pipeline"]
    assert len(parents) == 3 and len({r.data.tags.get("kfp.run_id") for r in parents}) == 3
    assert all(r.data.tags["kfp.run_id"].startswith("local-") for r in parents)
    by_parent = {p.info.run_id: sorted(r.data.tags["loomcfm.stage"] for r in runs
                                       if r.data.tags.get("mlflow.parentRunId") == p.info.run_id) for p in parents}
    assert sorted(by_parent.values()) == sorted([
        ["cache", "evaluate", "evaluate_reflow", "pairs", "train", "train_reflow"], RERUN_CHILDREN,
        ["cache", "evaluate_reflow", "pairs", "train_reflow"]])
    full = next(p for p in parents if len(by_parent[p.info.run_id]) == 6)
    assert {"base/fd_digits/euler-1", "base/nfe/euler-4", "reflow/fd_digits/euler-4", "reflow/nfe/euler-1"} <= \
        set(full.data.metrics), "the parent run carries the summary (what the runs table compares)"
    table = read_summary_table(load_config_text("digits", [f"tracking.local_dir={root / 'runs'}"]).tracking,
                               full.info.run_id)
    assert table.startswith("| method | NFE base | fd_digits base | NFE reflow | fd_digits reflow |")
    assert f"\n{table}\n" in printed, "run-local ends with the table `loomcfm run` prints"
    reflow_only = next(p for p in parents if len(by_parent[p.info.run_id]) == 4)
    settings = load_config_text("digits", [f"tracking.local_dir={root / 'runs'}"]).tracking
    assert "| euler-4 | - | - |" in read_summary_table(settings, reflow_only.info.run_id), "no base model there"


@pytest.mark.ray
@pytest.mark.kfp_local
def test_reflow_pipeline_applied_its_overrides(local_runs):
    root, model, _, _ = local_runs
    pairs = json.loads((_run_dirs(root, "reflow")[0] / "pairs" / "dataset").read_text())
    assert pairs["num_pairs"] == 160 and pairs["method"] == "euler-2"
    trained = json.loads((_run_dirs(root, "reflow")[0] / "train" / "model").read_text())
    assert trained["uri"].endswith("step-00000003.pt") and trained["alias"] == "reflow"


@pytest.mark.kfp_local
def test_prepare_in_a_kfp_pod_refuses_pod_local_storage_and_tracking(tmp_path, monkeypatch, capfd):
    """A step of a real KFP run has KFP_POD_NAME (set by the driver); with the digits defaults every later
    step would lose the dataset and the MLflow runs, so prepare fails first, naming both keys."""
    from components import prepare

    monkeypatch.setenv("KFP_POD_NAME", "loomcfm-abcde-system-container-impl-123")
    with pytest.raises(ConfigError) as caught:
        prepare.python_func(config_yaml="digits", overrides=[])
    message = str(caught.value)
    assert "storage.root='loomcfm-data'" in message and "tracking.uri=None" in message
    assert "KFP_POD_NAME=loomcfm-abcde" in message
    with pytest.raises(ConfigError, match=r"tracking\.uri='file:///tmp/mlruns'") as caught:
        prepare.python_func(config_yaml="digits", overrides=["storage.root=s3://b/p", "tracking.uri=file:///tmp/mlruns"])
    assert "storage.root" not in str(caught.value)
    # the same through kfp.local, whose steps inherit this process's environment: the first step, the cluster
    # check, already refuses it (and writes nothing to the pod-local folder); no stage starts
    with pytest.raises(RuntimeError):
        runner.run_local("full", {"config_yaml": "digits", "overrides": []}, str(tmp_path / "root"))
    output = re.sub(r"\x1b\[[0-9;]*m", "", "".join(capfd.readouterr()))
    assert "storage.root='loomcfm-data'" in output and "Executing task 'cache'" not in output
    assert not (tmp_path / "loomcfm-data").exists() and not (tmp_path / "loomcfm-runs").exists()


def test_the_cluster_preset_follows_the_platform(monkeypatch):
    """The packages' default reads its storage root and tracking server from loomcfm-env's variables."""
    from loomcfm_core.config import load_config_text

    monkeypatch.delenv("LOOMCFM_STORAGE_ROOT", raising=False)
    monkeypatch.delenv("LOOMCFM_TRACKING_URI", raising=False)
    default = load_config_text("cluster")
    assert (default.storage.root, default.tracking.uri) == ("s3://loomcfm/loomcfm", "http://mlflow.loomcfm.svc:5000")
    monkeypatch.setenv("LOOMCFM_STORAGE_ROOT", "s3://team-bucket/loom")
    monkeypatch.setenv("LOOMCFM_TRACKING_URI", "http://mlflow.team-a.svc:5000")
    cfg = load_config_text("cluster")
    assert (cfg.storage.root, cfg.tracking.uri) == ("s3://team-bucket/loom", "http://mlflow.team-a.svc:5000")
    # prepare hands the later steps the expanded text, so they need no environment of their own
    monkeypatch.delenv("LOOMCFM_STORAGE_ROOT")
    assert load_config_text(cfg.to_yaml()).storage.root == "s3://team-bucket/loom"
