"""The coupling ablation on kfp.local with digits: two of its trainings (``ablation.arms``: independent, and LOOM
after convergence) under one parent MLflow run, one plot and one table (KFP Markdown/HTML and MLflow artifacts).
Every step runs, at the smallest budget that trains and scores each arm; what each of the five arms' configs is:
``tests/test_ablation.py``; which coupling wins is a benchmark's question (``benchmarks/quality.py`` trains the
five arms long enough to tell), not a pass/fail test's."""

import contextlib
import io
import json
import os
import shutil

import pytest
import yaml
from mlflow.tracking import MlflowClient

from loomcfm_core.cli import main
from pipelines import runner

STEPS = ["train.max_steps=4", "train.batch_size=32", "train.warmup_steps=2", "eval.num_samples=64",
         "eval.methods=[euler-1,euler-2]", "ray.cpus_per_worker=1", "model.channels=32", "model.attn_resolutions=[]",
         "coupling.converge_epochs=1"]
ARMS = ["independent", "loom_converge"]


@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory, digits_dataset):
    root = tmp_path_factory.mktemp("ablation")
    shutil.copytree(digits_dataset, root / "store" / "datasets" / digits_dataset.name)  # its cache step: a no-op
    sets = [*STEPS, f"ablation.arms=[{','.join(ARMS)}]", f"storage.root={root}/store", f"tracking.local_dir={root}/runs"]
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


@pytest.mark.ray
@pytest.mark.kfp_local
def test_each_arm_trains_under_one_parent_with_one_plot_and_one_table(ablation_run):
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
    assert sorted((r.data.params["coupling.kind"], r.data.params["coupling.converge_epochs"]) for r in trains) == [
        ("independent", "0"), ("loom", "1")]
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "ablation")}
    assert files == {"ablation/ablation.md", "ablation/ablation.html", "ablation/ablation.png"}
    (report,) = (root / "kfp").glob("*/ablation-report")
    table = (report / "report").read_text()
    assert "| coupling | fd_digits euler-1 | fd_digits euler-2 |" in table and table.count("\n| ") == 1 + len(ARMS)
    assert "<table" in (report / "page").read_text() and "data:image/png;base64," in (report / "page").read_text()
    assert "| loom + convergence |" in printed, "run-local prints the table"

    assert all(parent.data.metrics[f"{arm}/fd_digits/euler"] > 0 for arm in ARMS), "each arm's curve on the parent"
    assert json.loads(next((root / "kfp").glob("*/ablation-plan/executor_output.json")).read_text())
