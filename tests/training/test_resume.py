"""Resuming through the CLI: "train longer" continues the same run folder, a changed identity is refused with
the keys, a changed schedule is refused unless allowed and then applied and recorded, and a rerun of a
finished training registers nothing new."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from mlflow.tracking import MlflowClient

from loomcfm_core.checkpoint import list_checkpoints, load_checkpoint
from tests.run_cli import TINY, call, error_line, inside, sets, store_sets

pytestmark = pytest.mark.ray
SCORED = ["eval.every_steps=5", "eval.during_training.num_samples=64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_dataset):
    """A 10-step training under the default run name, then the same command with ``train.max_steps=20`` and
    other free keys (logging, checkpoints, loader workers); both evaluate during training every 5 steps."""
    root = tmp_path_factory.mktemp("resume")
    shutil.copytree(digits_dataset, root / "store" / "datasets" / digits_dataset.name)
    with inside(root):
        first = call("train", *sets(*TINY, *SCORED, "train.max_steps=10", "train.checkpoint_every=5"),
                     *store_sets(root))
        assert first.returncode == 0, first.stderr[-4000:]
        longer = call("train", *sets(*TINY, *SCORED, "train.max_steps=20", "train.checkpoint_every=4", "train.log_every=2",
                                     "data.num_workers=1"), *store_sets(root))
    assert longer.returncode == 0, longer.stderr[-4000:]
    return root, _result(first), _result(longer), longer.stderr


def _result(proc) -> dict:
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def _mlflow(root) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")


def test_train_longer_resumes_the_same_run_from_its_last_step(trained):
    root, first, longer, stderr = trained
    assert longer["run_uri"] == first["run_uri"], "free keys do not make another run folder"
    assert f"resumed from {first['run_uri']}/checkpoints/step-00000010.pt (step 10)" in stderr
    assert longer["step"] == 20 and longer["mlflow_run_id"] == first["mlflow_run_id"]
    assert [s for s, _ in list_checkpoints(first["run_uri"])] == [12, 16, 20]
    run = _mlflow(root).get_run(first["mlflow_run_id"])
    steps = [m.step for m in _mlflow(root).get_metric_history(first["mlflow_run_id"], "train/loss")]
    assert steps == [5, 10, 12, 14, 16, 18, 20], "one MLflow run across both commands"
    scored = _mlflow(root).get_metric_history(first["mlflow_run_id"], "during_training/fd_digits/euler-2")
    assert [m.step for m in scored] == [5, 10, 15, 20], "the evaluation during training continues its curve"
    assert run.data.tags["loomcfm.attempts"] == "2", "each attempt is recorded on the run it continues"
    assert run.data.tags["loomcfm.attempt.1"] == "FINISHED (last logged step 10); resumed from step 10"


def test_a_changed_identity_is_refused_listing_the_keys(trained):
    root, first, _, _ = trained
    name = first["run_uri"].rsplit("/", 1)[-1]
    proc = call("train", *sets(*TINY, "train.max_steps=30", f"train.run_name={name}", "model.dropout=0.2",
                              "coupling.kind=independent"), *store_sets(root))
    assert proc.returncode == 1
    line = error_line(proc)
    assert re.search(rf"{first['run_uri']}/checkpoints/step-00000020\.pt: this run was trained with other "
                     r'coupling\.kind \("loom" -> "independent"\), model\.dropout \(0\.1 -> 0\.2\) \(checkpoint -> now\); '
                     r"these define the model and the data order and cannot change on resume", line), line
    assert "Started training worker group" not in proc.stderr, "refused before any worker starts"


def test_a_rerun_of_a_finished_training_registers_no_new_version(trained):
    root, first, longer, _ = trained
    client = _mlflow(root)
    before = client.search_model_versions("name = 'loomcfm-digits'")
    again = call("train", *sets(*TINY, "train.max_steps=20"), *store_sets(root))
    assert again.returncode == 0, again.stderr[-4000:]
    result = _result(again)
    assert result["model_version"] == longer["model_version"] and result["checkpoint_uri"] == longer["checkpoint_uri"]
    assert "finished at step 20 already" in again.stderr and "Started training worker group" not in again.stderr
    assert len(client.search_model_versions("name = 'loomcfm-digits'")) == len(before)
    version = client.get_model_version("loomcfm-digits", result["model_version"])
    assert version.tags["loomcfm.checkpoint_uri"] == longer["checkpoint_uri"]


def test_a_schedule_change_is_applied_and_recorded_only_when_allowed(trained):
    root, first, _, _ = trained
    name = first["run_uri"].rsplit("/", 1)[-1]
    args = ["train", *sets(*TINY, "train.max_steps=25", f"train.run_name={name}", "train.lr=5e-4",
                           "train.warmup_steps=10"), *store_sets(root)]
    refused = call(*args)
    assert refused.returncode == 1, "a refusal of the run's checkpoint, like another identity (exit 1 alike)"
    assert re.search(r"train: train\.lr \(0\.001 -> 0\.0005\), train\.warmup_steps \(5 -> 10\) differ from the run's "
                     r"latest checkpoint .*step-00000020\.pt \(checkpoint -> now\); to change the schedule on resume, "
                     r"allow it: --allow-change train\.lr --allow-change train\.warmup_steps", error_line(refused))
    allowed = call(*args, "--allow-change", "train.lr", "--allow-change", "train.warmup_steps")
    assert allowed.returncode == 0, allowed.stderr[-4000:]
    ckpt = load_checkpoint(_result(allowed)["checkpoint_uri"])
    assert ckpt["step"] == 25
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == 5e-4 and group["lr"] == pytest.approx(5e-4), "warm-up of 10 steps is over at 25"
    run_data = _mlflow(root).get_run(first["mlflow_run_id"]).data
    assert run_data.tags["loomcfm.changed.train.lr"] == "0.001 -> 0.0005 at step 20"
    assert run_data.params["train.lr/step_20"] == "0.0005" and run_data.params["train.lr"] == "0.001"
