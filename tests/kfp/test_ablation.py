"""The coupling ablation on kfp.local with digits: five trainings (one per coupling) under one parent MLflow
run, one plot and one table (KFP Markdown/HTML and MLflow artifacts), and LOOM ahead of independent
coupling at 1 NFE, where the paper's gap is largest."""

import contextlib
import io
import json
import os

import pytest
import yaml
from mlflow.tracking import MlflowClient

from loomcfm_core.ablation import ARMS
from loomcfm_core.cli import main
from pipelines import runner

# 200 steps, "a few hundred" as the issue asks: fd_digits at euler-1 was independent 687, fixed 685,
# minibatch_ot 317, loom 301, loom + convergence 282 in one such run; the gap is wide.
STEPS = ["train.max_steps=200", "train.batch_size=64", "train.warmup_steps=20", "eval.num_samples=200",
         "eval.methods=[euler-1,euler-4]", "ray.cpus_per_worker=1", "model.attn_resolutions=[]",
         "coupling.converge_epochs=3"]


@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    sets = [*STEPS, f"storage.root={root}/store", f"tracking.local_dir={root}/runs"]
    cwd = os.getcwd()
    os.chdir(root)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            code = main(["pipeline", "run-local", "--pipeline", "ablation", "--pipeline-root", str(root / "kfp"),
                         *[arg for item in sets for arg in ("--set", item)]])
    finally:
        os.chdir(cwd)
    assert code == 0
    return root, printed.getvalue()


def test_the_compiled_package_fans_out_with_parallel_for():
    spec, _ = yaml.safe_load_all((runner.COMPILED / "ablation_pipeline.yaml").read_text())
    loops = [task for task in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in task]
    assert len(loops) == 1 and loops[0]["parameterIterator"]["items"]["inputParameter"]
    assert set(spec["root"]["dag"]["tasks"]) >= {"prepare", "cache", "ablation-plan", "ablation-report"}


@pytest.mark.timeout(1800)  # five trainings and evaluations in kfp.local steps, one after another
def test_five_trainings_one_plot_one_table_under_one_parent(ablation_run):
    root, printed = ablation_run
    client = MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("loomcfm-digits")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("loomcfm.stage") == "pipeline"]
    arms = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
            and r.data.tags.get("loomcfm.stage") == "ablation"]
    assert sorted(r.data.tags["loomcfm.ablation_arm"] for r in arms) == sorted(ARMS)
    for arm in arms:
        stages = sorted(r.data.tags["loomcfm.stage"] for r in runs
                        if r.data.tags.get("mlflow.parentRunId") == arm.info.run_id)
        assert stages == ["evaluate", "train"], arm.data.tags["loomcfm.ablation_arm"]
    trains = [r for r in runs if r.data.tags.get("loomcfm.stage") == "train"]
    assert sorted(r.data.params["coupling.kind"] for r in trains) == sorted(
        ["independent", "minibatch_ot", "fixed", "loom", "loom"])
    assert sorted(r.data.params["coupling.converge_epochs"] for r in trains) == ["0", "0", "0", "0", "3"]
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "ablation")}
    assert files == {"ablation/ablation.md", "ablation/ablation.html", "ablation/ablation.png"}
    (report,) = (root / "kfp").glob("*/ablation-report")
    table = (report / "report").read_text()
    assert "| coupling | fd_digits euler-1 | fd_digits euler-4 |" in table and table.count("\n| ") == 6
    assert "<table" in (report / "page").read_text() and "data:image/png;base64," in (report / "page").read_text()
    assert "| loom + convergence |" in printed, "run-local prints the table"

    fd = {arm: parent.data.metrics[f"{arm}/fd_digits/euler-1"] for arm in ARMS}
    assert fd["loom"] < fd["independent"], fd
    assert json.loads(next((root / "kfp").glob("*/ablation-plan/executor_output.json")).read_text())
