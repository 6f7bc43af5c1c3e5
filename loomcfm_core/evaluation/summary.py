"""A pipeline's result on its parent MLflow run: the distance per solver of the base and the reflowed model as
curves MLflow draws itself (``base/fd_digits/euler`` and ``reflow/fd_digits/euler``, step = NFE; overlaid in the
experiment's saved view, :mod:`loomcfm_core.chart_view`), the table
``loomcfm run`` and ``loomcfm pipeline run-local`` print as the run's description and ``summary.md``, and
``fd_vs_nfe.png`` with both curves.

The last stage of both pipelines records it (:func:`loomcfm_core.stages.evaluate_reflow`), wherever it runs:
``loomcfm run``'s process, which hands it the base evaluation's rows, or a KFP step that finds them among its
parent's children (:func:`base_rows`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from loomcfm_core import tracking
from loomcfm_core.chart_view import save_overlay_view, view_name
from loomcfm_core.choices import parse_method
from loomcfm_core.config import TrackingConfig
from loomcfm_core.evaluation.plot import plot_fd_vs_nfe
from loomcfm_core.results import MethodResult
from loomcfm_core.storage import join, storage_for

SUMMARY_FILE = "summary.md"


def summary_table(metric: str, base: list[MethodResult], reflowed: list[MethodResult]) -> str:
    """The base-vs-reflow table, one row per method of either (``-`` where one of them lacks it)."""
    rows = {"base": {r.method: r for r in base}, "reflow": {r.method: r for r in reflowed}}
    methods = list(dict.fromkeys([r.method for r in base] + [r.method for r in reflowed]))
    lines = [f"| method | NFE base | {metric} base | NFE reflow | {metric} reflow |", "|---|---|---|---|---|"]
    for method in methods:
        cells = [f"{rows[m][method].nfe:.1f} | {rows[m][method].distance:.3f}" if method in rows[m] else "- | -"
                 for m in ("base", "reflow")]
        lines.append(f"| {method} | {' | '.join(cells)} |")
    return "\n".join(lines)


def curve_points(metric: str, rows: list[MethodResult], prefix: str = "") -> list[Metric]:
    """The rows as MLflow metrics MLflow charts as distance-vs-NFE curves: ``<prefix><metric>/<solver>`` at
    step = the method's NFE (rounded: an adaptive solver's mean), one series per solver; with ``seconds``
    per solver beside them when there is no prefix (an evaluation's own run)."""
    now, out = int(time.time() * 1000), []
    for row in rows:
        solver, step = parse_method(row.method)[0], max(1, round(row.nfe))
        out.append(Metric(f"{prefix}{metric}/{solver}", row.distance, now, step))
        if not prefix:
            out.append(Metric(f"seconds/{solver}", row.seconds, now, step))
    return out


def log_curves(client: MlflowClient, run_id: str, metric: str, curves: dict[str, list[MethodResult]]) -> None:
    """Log each model's rows on a run as :func:`curve_points` under ``<model>/``: how a parent run carries the
    curves of its models (the pipeline's base and reflow, the ablation's arms); with several models, the
    experiment's saved view overlaying them in one chart per solver (:mod:`loomcfm_core.chart_view`)."""
    points = [point for model, rows in curves.items() for point in curve_points(metric, rows, f"{model}/")]
    client.log_batch(run_id, metrics=points)
    if len(curves) > 1:
        solvers = list(dict.fromkeys(parse_method(row.method)[0] for rows in curves.values() for row in rows))
        save_overlay_view(client, client.get_run(run_id).info.experiment_id, metric, list(curves), solvers)


def base_rows(settings: TrackingConfig, experiment: str, parent_run_id: str) -> list[MethodResult]:
    """The rows of the base model's evaluation under the same parent (none in the reflow pipeline), found
    among the parent's children in the store of ``settings`` (the ``tracking`` section) and ``experiment``."""
    client = MlflowClient(tracking.tracking_uri(settings))
    runs = client.search_runs([tracking.experiment_id(settings, experiment)], max_results=5,
                              order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                            f"tags.`{tracking.STAGE_TAG}` = 'evaluate' and attributes.status = 'FINISHED'")
    if not runs or "loomcfm.eval_uri" not in runs[0].data.tags:
        return []
    uri = join(runs[0].data.tags["loomcfm.eval_uri"], "results.json")
    return [MethodResult(**row) for row in json.loads(storage_for(uri).read_text(uri))["rows"]]


def record_summary(settings: TrackingConfig, parent_run_id: str, metric: str, base: list[MethodResult],
                   reflowed: list[MethodResult]) -> str:
    """Log the curves, the table (as the run's description and ``summary.md``) and the two-curve plot to the
    parent run; returns the table."""
    table = summary_table(metric, base, reflowed)
    curves = {name: rows for name, rows in (("base", base), ("reflow", reflowed)) if rows}
    client = MlflowClient(tracking.tracking_uri(settings))
    log_curves(client, parent_run_id, metric, curves)
    overlaid = (f", overlaid in the experiment's saved view \"{view_name(metric, curves)}\" (its Runs page's "
                "Views menu)") if len(curves) > 1 else ""
    client.set_tag(parent_run_id, tracking.NOTE_TAG,
                   f"**{metric} vs NFE, base vs reflow** (lower is better)\n\n{table}\n\nCharts: `base/{metric}/*` "
                   f"and `reflow/{metric}/*`, step = NFE{overlaid}; `fd_vs_nfe.png` under Artifacts draws both.")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / SUMMARY_FILE).write_text(table + "\n")
        client.log_artifact(parent_run_id, str(Path(tmp) / SUMMARY_FILE))
        client.log_artifact(parent_run_id, str(plot_fd_vs_nfe(curves, metric, Path(tmp) / "fd_vs_nfe.png")))
    return table


def read_summary_table(settings: TrackingConfig, parent_run_id: str) -> str:
    """The table a pipeline recorded on its parent run (for ``loomcfm pipeline run-local`` to print)."""
    return tracking.load_text(settings, parent_run_id, SUMMARY_FILE).rstrip("\n")
