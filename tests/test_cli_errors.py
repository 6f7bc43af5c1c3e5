"""Bad input through the CLI as a user types it: every case ends with one ``loomcfm:`` line that names the
setting, flag or file, no traceback, the exit code of its kind (2: config, 1: everything else), and nothing
that looks complete left behind (no manifest, no checkpoint, no results).

The cases run in this process (``cli.main``), which says the same as a ``loomcfm`` process would; the few
marked ``process`` run as one, for what only a process shows: the console script's exit code and stderr as a
user sees them, and a disk that is full in a mount namespace of the command's own."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
from PIL import Image

from loomcfm_core.checksums import sha256_file
from tests.conftest import SMALL
from tests.run_cli import TINY, call, error_line, on_small_disk, run, sets, store_sets


@pytest.fixture(scope="module")
def world(tmp_path_factory, digits_dataset, trained_run):
    """The session's cached digits dataset (read only: a row that damages it copies it first) and 3-step
    checkpoint, and a picture that is not a checkpoint."""
    png = tmp_path_factory.mktemp("world") / "picture.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(png)
    return {"dataset": str(digits_dataset), "checkpoint": str(trained_run / "checkpoints" / "step-00000003.pt"),
            "png": png}


def _copy_dataset(world, tmp_path) -> Path:
    copy = tmp_path / "store" / "datasets" / Path(world["dataset"]).name
    shutil.copytree(world["dataset"], copy)
    return copy


def _modify_shard(path: Path) -> None:
    """A valid HDF5 file with other pixels (same size): only its sha256 tells."""
    with h5py.File(path, "r+") as fh:
        fh["images"][0] = 255 - fh["images"][0]


def _imagefolder(root: Path, classes: list[str], mode: str) -> Path:
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new(mode, (8, 8), (i * 40, 90, 200) if mode == "RGB" else i * 40).save(folder / f"{i}.png")
    return root


SMALL_NET = [item for item in SMALL if item.startswith("model.")]  # the network the session's checkpoint has
TRUNCATED_AT = 4331  # bytes: past the zip's local header, before its central directory


@dataclass
class Row:
    """One case: the command (given the shared world and the case's folder), the exit code, a pattern the
    error line must match, and what must not exist afterwards (relative to the case's folder)."""

    args: Callable[[dict, Path], list[str]]
    code: int
    pattern: Callable[[dict, Path], str]
    absent: list[str] = field(default_factory=list)
    one_line: bool = True  # nothing at all on stderr before the error (it failed before any work)
    disk: str | None = None  # the size of a tmpfs the command finds mounted on <case>/store (a full disk)
    process: bool = False  # run as a `loomcfm` process (always with a disk)


def _train_on(damage: Callable[[Path], None]) -> Callable[[dict, Path], list[str]]:
    def args(world, tmp_path):
        copy = _copy_dataset(world, tmp_path)
        damage(copy)
        return ["train", "--dataset", str(copy), *sets(*TINY, "train.max_steps=5"), *store_sets(tmp_path)]
    return args


ROWS = {
    "storage.root s3:/": Row(lambda w, t: ["cache", *sets("storage.root=s3:/b/x")], 2,
                             lambda w, t: r"storage\.root: 's3:/b/x' is not a storage URI \(missing '/': s3:// then a "
                                          r"bucket\); expected a local path, file:///absolute/path or s3://bucket/prefix$",
                             ["s3:"]),
    "storage.root S3://": Row(lambda w, t: ["train", *sets("storage.root=S3://b/x")], 2,
                              lambda w, t: r"storage\.root: 'S3://b/x' is not a storage URI \(the scheme is s3:// in "
                                           r"lower case\)", ["S3:", "loomcfm-data"]),
    "storage.root http://": Row(lambda w, t: ["run", *sets("storage.root=http://x/y")], 2,
                                lambda w, t: r"storage\.root: 'http://x/y' is not a storage URI; expected", ["http:"]),
    "--ckpt s3:/": Row(lambda w, t: ["evaluate", "--ckpt", "s3:/b/x.pt"], 1,
                       lambda w, t: r"--ckpt: 's3:/b/x\.pt' is not a storage URI", ["loomcfm-data"]),
    "--output http://": Row(lambda w, t: ["sample", "--ckpt", w["checkpoint"], "--output", "http://x/out",
                                          "--num_images", "2", "--method", "euler-1"], 1,
                            lambda w, t: r"--output: 'http://x/out' is not a storage URI", ["http:"]),
    "modified shard": Row(_train_on(lambda d: _modify_shard(d / "train" / "shard-00000.h5")), 1,
                          lambda w, t: rf"{t}/store/datasets/digits-\w+/train/shard-00000\.h5: checksum mismatch: sha256 "
                                       r"\w+ does not match the expected \w+; the cached dataset is damaged: run "
                                       r"`loomcfm cache` with the same config to repair it$",
                          ["store/runs", "home/.cache/loomcfm/ray"], one_line=False),
    "truncated shard": Row(_train_on(lambda d: (d / "train" / "shard-00001.h5").write_bytes(
                               (d / "train" / "shard-00001.h5").read_bytes()[:5000])), 1,
                           lambda w, t: r"train/shard-00001\.h5: size mismatch: 5000 bytes, expected \d+ \(truncated or "
                                        r"rewritten\); the cached dataset is damaged", ["store/runs"], one_line=False),
    "deleted manifest": Row(_train_on(lambda d: (d / "manifest.json").unlink()), 1,
                            lambda w, t: rf"{t}/store/datasets/digits-\w+: no manifest\.json; the dataset is missing or "
                                         r"incomplete \(run `loomcfm cache` first", ["store/runs"], one_line=False),
    "disk full": Row(lambda w, t: ["train", "--dataset", w["dataset"], *sets(*TINY, "train.max_steps=5",
                                                                           "train.checkpoint_every=5"), *store_sets(t)],
                     1, lambda w, t: rf"{t}/store/runs/digits-\w+/checkpoints/step-00000005\.pt: cannot write it \(No "
                                     r"space left on device\); nothing was written$", one_line=False, disk="256k"),
    "num_head_channels": Row(lambda w, t: ["train", *sets("model.num_head_channels=48"), *store_sets(t)], 2,
                             lambda w, t: r"model\.num_head_channels=48 does not divide the attention width 64",
                             ["store"]),
    "misspelt method": Row(lambda w, t: ["evaluate", "--ckpt", w["checkpoint"], "--methods", "euler-4", "foo-1",
                                         *sets(*TINY), *store_sets(t)], 1,
                           lambda w, t: r"sampling method 'foo-1': expected <solver>-<steps> with solver one of euler, "
                                        r"midpoint, rk4, dopri5", ["store"]),
    "evaluate missing --ckpt": Row(lambda w, t: ["evaluate", "--ckpt", str(t / "nope.pt"), *store_sets(t)], 1,
                                   lambda w, t: rf"no checkpoint at {t}/nope\.pt$", ["store"], process=True),
    "sample --ckpt is a PNG": Row(lambda w, t: ["sample", "--ckpt", str(w["png"]), "--output", str(t / "out"),
                                                "--num_images", "2", "--method", "euler-1"], 1,
                                  lambda w, t: rf"{w['png']} is not a checkpoint \(torch\.load: UnpicklingError", ["out"]),
    "evaluate another preset": Row(lambda w, t: ["evaluate", "--config", "cifar10", "--ckpt", w["checkpoint"]], 1,
                                   lambda w, t: r"the weights do not fit the configured model \(--config / --set model\.\*\): "
                                                r"it was trained with other data\.channels \(1 -> 3\), data\.resolution "
                                                r"\(8 -> 32\), model\.attn_resolutions \(\[\] -> \[16\]\)",
                                   ["loomcfm-data"]),
    "sample another preset": Row(lambda w, t: ["sample", "--config", "imagenet64", "--ckpt", w["checkpoint"],
                                               "--output", str(t / "out"), "--num_images", "2", "--method", "euler-1"],
                                 1, lambda w, t: r"model\.channels \(32 -> 192\)", ["out"]),
    "evaluate a truncated checkpoint": Row(lambda w, t: ["evaluate", "--ckpt", _truncated(w, t), *store_sets(t)], 1,
                                           lambda w, t: rf"{t}/cut\.pt is not a checkpoint \(torch\.load: OSError: "
                                                        r"\[Errno 22\] Invalid argument\)$", ["store"]),
    "sample a truncated checkpoint": Row(lambda w, t: ["sample", "--ckpt", _truncated(w, t), "--output", str(t / "out"),
                                                       "--num_images", "2", "--method", "euler-1"], 1,
                                         lambda w, t: rf"{t}/cut\.pt is not a checkpoint", ["out"]),
    "sample at another resolution": Row(lambda w, t: ["sample", "--ckpt", w["checkpoint"], "--output", str(t / "out"),
                                                      "--num_images", "2", "--method", "euler-1",
                                                      *sets(*SMALL_NET, "data.resolution=16")], 1,
                                        lambda w, t: r"the weights do not fit the configured model \(--config / --set "
                                                     r"model\.\*\): it was trained with other data\.resolution \(8 -> 16\) "
                                                     r"\(checkpoint -> config\)$", ["out"]),
    "run on own data without Inception": Row(lambda w, t: ["run", *sets(f"data.source=imagefolder:{_imagefolder(t / 'faces', ['a', 'b'], 'L')}",
                                                                        "data.name=faces"), *store_sets(t)], 1,
                                             lambda w, t: r"eval\.inception_weights is not set: .*`loomcfm weights fetch "
                                                          r"--to URI`.*; or score with the classifier .*: --set "
                                                          r"eval\.feature_network=classifier$", ["store"]),
    "RGB into 1 channel": Row(lambda w, t: ["cache", *sets(f"data.source=imagefolder:{_imagefolder(t / 'rgb', ['a', 'b'], 'RGB')}",
                                                            "data.name=rgb"), *store_sets(t)], 1,
                              lambda w, t: rf"{t}/rgb/train/a/0\.png: a RGB image with 3 channels, but data\.channels=1; "
                                           r"set data\.convert=true to convert it to L", ["store/datasets/rgb-*/manifest.json"],
                              one_line=False),
    "one class, classifier": Row(lambda w, t: ["cache", *sets(f"data.source=imagefolder:{_imagefolder(t / 'one', ['a'], 'L')}",
                                                                "data.name=one", "eval.feature_network=classifier"),
                                               *store_sets(t)], 1,
                                 lambda w, t: r"eval\.feature_network=classifier: .* has 1 class, .* for FID set "
                                              r"eval\.feature_network=inception and eval\.inception_weights=",
                                 ["store/datasets/one-*/classifier.pt"], one_line=False),
    "unknown key in a file": Row(lambda w, t: ["config", "show", "--config", str(_write(t / "my.yaml",
                                                                                    "extends: digits\ntrain:\n  lrr: 1\n"))],
                                 2, lambda w, t: r"train\.lrr: unknown config key; did you mean train\.lr\?"),
    "misspelt preset": Row(lambda w, t: ["cache", "--config", "digts"], 2,
                           lambda w, t: r"config 'digts' is neither a preset .* nor a file; did you mean digits\?$",
                           ["loomcfm-data"], process=True),
    "misspelt --allow-change": Row(lambda w, t: ["train", "--allow-change", "train.lrr"], 2,
                                   lambda w, t: r"train\.allow_changes: 'train\.lrr' is not a schedule key; did you mean "
                                                r"train\.lr", ["loomcfm-data"]),
}


def _truncated(world, tmp_path) -> str:
    """The checkpoint cut short where a zip archive's first member ends: torch.load fails with a bare
    ``[Errno 22] Invalid argument``, a download or copy interrupted there."""
    cut = tmp_path / "cut.pt"
    cut.write_bytes(Path(world["checkpoint"]).read_bytes()[:TRUNCATED_AT])
    return str(cut)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.ray] if row.disk else
                                               [pytest.mark.process] if row.process else [])
                                  for name, row in ROWS.items()])
def test_bad_input_is_one_line_naming_it(name, world, tmp_path, capfd):
    row = ROWS[name]
    if row.process or row.disk:
        prefix = on_small_disk(tmp_path / "store", row.disk) if row.disk else []
        proc = run(*row.args(world, tmp_path), cwd=tmp_path, timeout=300, prefix=prefix)
    else:
        proc = call(*row.args(world, tmp_path))
    assert proc.returncode == row.code, proc.stderr[-4000:]
    line = error_line(proc)
    assert line.startswith("loomcfm: config error: " if row.code == 2 else "loomcfm: error: "), line
    assert re.search(row.pattern(world, tmp_path), line), line
    if row.one_line:
        assert proc.stderr.strip() == line, proc.stderr[-4000:]
    for pattern in row.absent:
        assert not list(tmp_path.glob(pattern)), f"{pattern} exists after a failed {name}"
    assert not list(tmp_path.rglob("result.json")) and not list(tmp_path.rglob("step-*.pt"))
    if row.disk:
        left = (tmp_path / "store.listing").read_text().split()
        assert f"{tmp_path}/store/runs" in left, "it trained until the disk was full"
        assert not [p for p in left if re.search(r"step-|result\.json|\.tmp-|lease\.json", p)], left
        assert proc.stderr.count("Started training worker group") == 1, "a full disk is not retried"


def test_cache_repairs_a_damaged_dataset(world, tmp_path, capfd):
    copy = _copy_dataset(world, tmp_path)
    shard = copy / "train" / "shard-00000.h5"
    _modify_shard(shard)
    proc = call("cache", *store_sets(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["dataset_uri"] == str(copy)
    assert f"{copy}: rebuilding it ({shard}: checksum mismatch" in proc.stderr
    manifest = json.loads((copy / "manifest.json").read_text())
    assert sha256_file(shard) == manifest["splits"]["train"]["shards"][0]["sha256"]
    assert np.array_equal(h5py.File(shard)["images"][0], h5py.File(Path(world["dataset"]) / "train" / "shard-00000.h5")["images"][0])


def test_rgb_images_are_converted_when_asked_and_the_conversion_is_logged(tmp_path, capfd):
    source = _imagefolder(tmp_path / "rgb", ["a", "b"], "RGB")
    proc = call("cache", *sets(f"data.source=imagefolder:{source}", "data.name=rgb", "data.convert=true"),
                *store_sets(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"{source}/train: converted 6 RGB images to 1 channels (data.convert=true)" in proc.stderr


def test_one_source_folder_is_one_dataset_however_it_is_written(tmp_path, capfd):
    _imagefolder(tmp_path / "faces", ["a", "b"], "L")
    first = call("cache", *sets("data.source=imagefolder:faces", "data.name=f"), *store_sets(tmp_path))
    second = call("cache", *sets(f"data.source=imagefolder:{tmp_path}/./faces/", "data.name=f"),
                  *store_sets(tmp_path))
    a, b = (json.loads(p.stdout[p.stdout.index("{"):]) for p in (first, second))
    assert a["dataset_uri"] == b["dataset_uri"] and a["created"] and not b["created"]
