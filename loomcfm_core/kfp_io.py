"""What a KFP step reports besides its return values: numbers for the run's Metrics view, and small
artifacts that point at the data in object storage, so the KFP UI shows lineage without copying it."""

from __future__ import annotations

import json
from numbers import Number
from pathlib import Path

from loomcfm_core.results import EvalResult


def log_numbers(metrics, numbers: dict) -> None:
    """Every numeric entry of a stage's summary into an ``Output[Metrics]``, and all of them so far as JSON in
    its file.

    ``log_metric`` only sets metadata; without a file the artifact is a path that does not exist, which
    kfp.local's cache takes for a lost output (``kfp/local/cache.py``: a missing local artifact file is a
    cache miss), so a step with metrics would never be reused.
    """
    for key, value in numbers.items():
        if isinstance(value, Number) and not isinstance(value, bool):
            metrics.log_metric(key, float(value))
    Path(metrics.path).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics.path).write_text(json.dumps(dict(metrics.metadata), indent=2, sort_keys=True))


def point_to(artifact, uri: str, **metadata) -> None:
    """Make an ``Output[Artifact]`` a pointer: its metadata and a small JSON file name the storage URI."""
    artifact.metadata.update({"uri": uri, **metadata})
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps({"uri": uri, **metadata}, indent=2))


def report_evaluation(metrics, markdown, evaluation: EvalResult) -> None:
    """An evaluation (from ``stages.evaluate``) as an ``Output[Metrics]`` (distance and NFE per method) and its
    table as an ``Output[Markdown]`` for the KFP UI."""
    log_numbers(metrics, evaluation.metrics())
    Path(markdown.path).write_text(f"**{evaluation.metric}** vs NFE of `{evaluation.checkpoint_uri}`\n\n"
                                   f"{evaluation.table}\n\ngrids and plot: `{evaluation.eval_uri}`\n")
