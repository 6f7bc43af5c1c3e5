"""Evaluation results of one checkpoint kept per evaluation, and an FD-vs-NFE plot a person can read."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import matplotlib.pyplot as plt
from PIL import Image

from loomcfm_core.evaluation.plot import draw_fd_vs_nfe
from loomcfm_core.results import MethodResult
from tests.conftest import SMALL
from tests.run_cli import call, sets


def test_two_evaluations_of_one_checkpoint_keep_their_own_results(tmp_path, checkpoint):
    common = sets(*SMALL, f"storage.root={tmp_path}/store", f"tracking.local_dir={tmp_path}/runs",
                  "eval.num_samples=64", "eval.batch_size=64")
    first = call("evaluate", "--ckpt", checkpoint, "--methods", "euler-1", *common)
    assert first.returncode == 0, first.stderr[-4000:]
    first_uri = json.loads(first.stdout[first.stdout.index("{"):])["eval_uri"]
    before = {p.name: p.read_bytes() for p in Path(first_uri).iterdir()}
    second = call("evaluate", "--ckpt", checkpoint, "--methods", "euler-2", "midpoint-1", "euler-2", *common)
    assert second.returncode == 0, second.stderr[-4000:]
    second_uri = json.loads(second.stdout[second.stdout.index("{"):])["eval_uri"]

    assert Path(first_uri).parent == Path(second_uri).parent == Path(checkpoint).parent.parent / "eval" / "step-00000003"
    assert first_uri != second_uri and Path(first_uri).name.startswith("fd_digits-n64-")
    assert {p.name: p.read_bytes() for p in Path(first_uri).iterdir()} == before, "the first evaluation is intact"
    assert sorted(p.name for p in Path(second_uri).glob("samples_*.png")) == ["samples_euler-2.png",
                                                                             "samples_midpoint-1.png"]
    results = json.loads((Path(second_uri) / "results.json").read_text())
    assert results["methods"] == ["euler-2", "midpoint-1"] and [r["nfe"] for r in results["rows"]] == [2, 2], \
        "a method given twice is evaluated once"
    assert Image.open(Path(second_uri) / "samples_euler-2.png").size == (8 * 66 + 2, 8 * 66 + 2), "64 px per digit"


def _rows(distances: list[float], dopri_nfe: float) -> list[MethodResult]:
    nfes = [1, 2, 4, 8, dopri_nfe]
    names = ["euler-1", "euler-2", "euler-4", "euler-8", "dopri5-1"]
    return [MethodResult(name, nfe, d, 0.0) for name, nfe, d in zip(names, nfes, distances)]


def test_fd_vs_nfe_plot_has_plain_ticks_and_no_overlapping_labels():
    """Base and reflow share NFE values and, after reflow, nearly the same distances: the worst case for
    labels printed on top of each other."""
    curves = {"base": _rows([9.0, 6.0, 4.0, 3.0, 2.5], 26.0), "reflow": _rows([8.9, 5.9, 4.0, 3.05, 2.5], 20.0)}
    fig = draw_fd_vs_nfe(curves, "fd_digits")
    fig.canvas.draw()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8", "20", "26"]
    assert not ax.xaxis.get_minorticklabels() or all(not t.get_text() for t in ax.xaxis.get_minorticklabels())
    labels = [t for t in ax.texts if t.get_text() in {r.method for r in curves["base"]}]
    assert len(labels) == 10
    boxes = [t.get_window_extent() for t in labels]
    overlapping = [(a.get_text(), b.get_text()) for (a, x), (b, y) in itertools.combinations(zip(labels, boxes), 2)
                   if x.overlaps(y)]
    assert not overlapping, overlapping
    plt.close(fig)


def test_fd_vs_nfe_plot_shows_close_distances_without_an_axis_offset():
    curves = {"base": _rows([4418.2, 4418.9, 4419.4, 4420.1, 4418.5], 26.0)}
    fig = draw_fd_vs_nfe(curves, "fd_faces")
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.yaxis.get_offset_text().get_text() == "", "no '+4.418e3' above the axis"
    assert any(t.get_text().startswith("44") for t in ax.get_yticklabels()), [t.get_text() for t in ax.get_yticklabels()]
    plt.close(fig)
