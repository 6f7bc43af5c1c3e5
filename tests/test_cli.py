"""The command line: `loomcfm sample` with the reference's flags, one line (no traceback) for an error, and the
subcommands other packages add through the ``loomcfm.commands`` entry points (the pipelines' among them)."""

import argparse
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loomcfm_core.cli import COMMANDS_GROUP, build_parser, command_plugins, main
from tests.conftest import SMALL, free_port


def _sets():
    return [arg for item in SMALL for arg in ("--set", item)]


def test_sample_writes_pngs_and_a_grid(tmp_path, checkpoint, capsys):
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", checkpoint, "--output", str(out), "--num_images", "10", "--nrows", "5",
                 "--method", "midpoint-2", "--batch_size", "4", *_sets()]) == 0
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:05d}.png" for i in range(10)]
    assert Image.open(out / "00000.png").size == (8, 8)
    grid = Image.open(out / "grid.png")
    assert grid.size == (5 * 66 + 2, 2 * 66 + 2)  # 5 per row, each 8x8 image shown at 64x64, 2-pixel padding
    cell = np.asarray(grid.convert("L"))[2:66, 2:66].reshape(8, 8, 8, 8)  # [row, y in block, col, x in block]
    assert (cell == cell[:, :1, :, :1]).all(), "enlarged by nearest neighbour: each pixel an 8x8 square"
    assert np.array_equal(cell[:, 0, :, 0], np.asarray(Image.open(out / "00000.png").convert("L")))
    assert '"nfe": 4.0' in capsys.readouterr().out


def test_sample_rejects_bad_input(tmp_path, checkpoint, capsys):
    assert main(["sample", "--ckpt", checkpoint, "--output", str(tmp_path), "--num_images", "2",
                 "--method", "euler", *_sets()]) == 1
    assert "expected <solver>-<steps>" in capsys.readouterr().err
    assert main(["sample", "--ckpt", checkpoint, "--output", str(tmp_path), "--num_images", "2",
                 "--method", "euler-1", "--set", "model.channels=64"]) == 1
    assert "weights do not fit the configured model (--config / --set model.*): it was trained with other " \
           "model.attn_resolutions ([] -> [4]), model.channels (32 -> 64)" in capsys.readouterr().err
    torch.save({"something": 1}, tmp_path / "junk.pt")
    assert main(["sample", "--ckpt", str(tmp_path / "junk.pt"), "--output", str(tmp_path), "--num_images", "2",
                 "--method", "euler-1", *_sets()]) == 1
    assert "neither a loomcfm checkpoint nor a reference" in capsys.readouterr().err


@pytest.mark.process
def test_unreachable_tracking_server_is_one_line_naming_the_uri(tmp_path):
    """An MLflow server that is down ends the command with one line that names it, not a traceback."""
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    proc = subprocess.run([sys.executable, "-m", "loomcfm_core.cli", "cache", "--set", f"tracking.uri={uri}",
                           "--set", f"storage.root={tmp_path / 'store'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("loomcfm:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    assert errors[0].startswith(f"loomcfm: error: cannot reach the MLflow tracking server at {uri};"), errors[0]
    assert not (tmp_path / "store").exists(), "no stage work starts without the tracking server"


def probe(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """A plugin's ``register``: one subcommand that exits 7."""
    commands.add_parser("probe", parents=[common]).set_defaults(handler=lambda args: 7)


def test_subcommands_come_from_the_entry_points_of_installed_packages(tmp_path, monkeypatch):
    """What ``pip install`` writes (a dist-info with entry_points.txt) on the path is all a plugin needs."""
    dist = tmp_path / "loomcfm_probe-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: loomcfm-probe\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{COMMANDS_GROUP}]\nprobe = tests.test_cli:probe\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "probe" in [entry.name for entry in command_plugins()]
    assert main(["probe", "--set", "train.lr=1e-4"]) == 7


def pyproject_commands() -> list[metadata.EntryPoint]:
    declared = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    return [metadata.EntryPoint(name, value, COMMANDS_GROUP)
            for name, value in declared["project"]["entry-points"][COMMANDS_GROUP].items()]


def test_the_pipeline_commands_come_from_the_pipelines_entry_point():
    """The library names no front door: ``loomcfm pipeline`` is what pipelines/cli.py registers."""
    from pipelines import cli as pipeline_cli

    args = build_parser(pyproject_commands()).parse_args(["pipeline", "run-local", "--pipeline", "reflow"])
    assert args.handler is pipeline_cli.run and args.pipeline_command == "run-local" and args.overrides == []


def test_the_installed_package_has_pyprojects_commands():
    """An install made before pyproject.toml changed its entry points lacks commands: reinstall the package
    (``pip install -e .``) when this fails."""
    assert {(e.name, e.value) for e in command_plugins()} == {(e.name, e.value) for e in pyproject_commands()}, \
        "the installed loomcfm predates pyproject.toml's [project.entry-points]: reinstall it (pip install -e .)"
