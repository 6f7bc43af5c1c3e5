"""The reference implementation's flags on ``loomcfm train``, ``pairs`` and ``evaluate`` (spec §2, from
Araachie/loom-cfm @213f24f ``train.py``/``generate_pairs.py``/``evaluate.py:parse_args``)."""

import json

import pytest
import torch

from loomcfm_core.checkpoint import list_checkpoints, load_checkpoint
from loomcfm_core.cli import build_parser, main, resolve_config
from loomcfm_core.data.dataset import ShardedDataset
from loomcfm_core.errors import UsageError
from loomcfm_core.reference.flags import flag_overrides
from tests.conftest import SMALL
from tests.run_cli import TINY, call, sets, store_sets


def _config(argv):
    args = build_parser().parse_args(argv)
    return resolve_config(args.config, args.overrides + flag_overrides(args))


def test_train_flags_become_config_values():
    cfg = _config(["train", "--run-name", "r1", "--num-gpus", "4", "--random-seed", "1543", "--resume-step", "50000",
                   "--wandb"])
    assert (cfg.train.run_name, cfg.ray.num_workers, cfg.ray.use_gpu, cfg.train.seed) == ("r1", 4, True, 1543)
    plain = _config(["train"])
    assert (plain.train.run_name, plain.ray.num_workers, plain.ray.use_gpu, plain.train.seed) == (None, 1, False, 0)
    # a RayJob's ray.* come from kube.*: the flag would be overwritten there, so it is refused, naming what to set
    with pytest.raises(UsageError, match=r"--num-gpus .*\(--launcher rayjob\) takes from kube.ray_workers x "
                       r"kube.gpus_per_worker"):
        _config(["train", "--launcher", "rayjob", "--num-gpus", "4"])
    assert _config(["train", "--launcher", "rayjob", "--run-name", "r1"]).train.run_name == "r1"


def test_pairs_and_evaluate_flags(tmp_path):
    cfg = _config(["pairs", "--ckpt", "c.pt", "--output", str(tmp_path), "--num_images", "64", "--method", "euler-2",
                   "--batch_size", "16"])
    assert (cfg.reflow.num_pairs, cfg.reflow.method, cfg.sample.batch_size) == (64, "euler-2", 16)
    args = build_parser().parse_args(["evaluate", "--config", "digits", "--ckpt", "c.pt"])
    assert (args.config, args.ckpt) == ("digits", "c.pt")
    for command, flags in (("train", ["--run-name", "--num-gpus", "--resume-step", "--random-seed", "--wandb",
                                      "--dataset", "--set", "--allow-change", "--launcher", "--wait"]),
                           ("pairs", ["--ckpt", "--output", "--num_images", "--method", "--batch_size", "--set"]),
                           ("evaluate", ["--config", "--ckpt", "--methods", "--dataset"])):
        text = build_parser()._subparsers._group_actions[0].choices[command].format_help()
        assert all(flag in text for flag in flags), (command, [f for f in flags if f not in text])


def test_pairs_writes_num_images_pairs_where_asked(tmp_path, checkpoint, capsys):
    out = tmp_path / "my-pairs"
    assert main(["pairs", "--ckpt", checkpoint, "--output", str(out), "--num_images", "64", "--method", "euler-2",
                 "--batch_size", "32", *sets(*SMALL, f"storage.root={tmp_path}/store")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs_uri"] == str(out) and result["num_pairs"] == 64 and result["method"] == "euler-2"
    pairs = ShardedDataset(str(out))
    assert len(pairs) == 64 and pairs.manifest["method"] == "euler-2" and pairs.is_pairs
    assert not (tmp_path / "store" / "datasets").exists() or not any(
        p.name.startswith("digits-pairs") for p in (tmp_path / "store" / "datasets").iterdir())


@pytest.mark.ray
def test_train_resume_step_resumes_from_that_checkpoint_not_the_latest(tmp_path, store):
    common = [*sets(*TINY, "train.checkpoint_every=2", "train.keep_checkpoints=5"), *store_sets(tmp_path)]
    first = call("train", "--run-name", "r", *common, *sets("train.max_steps=4"))
    assert first.returncode == 0, first.stderr[-4000:]
    run_uri = json.loads(first.stdout[first.stdout.index("{"):])["run_uri"]
    assert run_uri.endswith("/runs/r") and [s for s, _ in list_checkpoints(run_uri)] == [2, 4]
    later = load_checkpoint(f"{run_uri}/checkpoints/step-00000004.pt")

    again = call("train", "--run-name", "r", "--resume-step", "2", "--wandb", *common, *sets("train.max_steps=3"))
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resumed from {run_uri}/checkpoints/step-00000002.pt (step 2)" in again.stderr
    assert "--wandb: tracking is MLflow" in again.stderr
    result = json.loads(again.stdout[again.stdout.index("{"):])
    assert result["step"] == 3 and result["checkpoint_uri"] == f"{run_uri}/checkpoints/step-00000003.pt"
    assert [s for s, _ in list_checkpoints(run_uri)] == [2, 3], "the later checkpoint is not used"
    aside = load_checkpoint(f"{run_uri}/set-aside/step-00000004.pt")
    assert aside["step"] == 4 and all(torch.equal(aside["ema"][k], v) for k, v in later["ema"].items())

    missing = call("train", "--run-name", "r", "--resume-step", "7", *common)
    assert missing.returncode == 1 and "--resume-step 7:" in missing.stderr and "(steps: 2, 3;" in missing.stderr
