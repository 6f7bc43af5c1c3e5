"""A saved view of an experiment's runs page that overlays the curves of several models in one chart per solver
(``base/fd_digits/euler`` and ``reflow/fd_digits/euler``, step = NFE, on the pipeline's parent run; the
ablation's arms likewise).

MLflow generates one chart per metric key, and no tag or artifact asks it for a chart of several keys; the
runs page's saved views can hold one. A view is the experiment tag ``mlflow.sharedViewState.<id>``: an
envelope ``{"name", "createdAt", "updatedAt", "state"}`` whose ``state`` is the page state as JSON, opened
from the page's Views menu or by the link ``?viewStateShareKey=<id>`` (MLflow 3.17.2's UI bundle:
``EXPERIMENT_PAGE_VIEW_STATE_SHARE_TAG_PREFIX``, ``decodeSavedViewEnvelope``; the charts are
``RunsChartsLineCardConfig``s, the sections ``ChartSectionConfig``s). This is the UI's own format, not an API
(pyproject pins mlflow 3.17.*): a UI that cannot read it says "share key is invalid" and shows its default
page; nothing else reads it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable

from mlflow.tracking import MlflowClient

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
OWN_PREFIX = "loomcfm-"  # the views loomcfm writes (a user's own views are left alone)
MAX_TAG_CHARS = 20_000  # MLflow's MAX_EXPERIMENT_TAG_VAL_LENGTH


def view_key(metric: str, models: Iterable[str]) -> str:
    """The id of the view overlaying ``models`` for ``metric`` (the same models and metric: the same view,
    rewritten, not another one)."""
    return f"{OWN_PREFIX}{metric}-" + "-vs-".join(models)


def view_name(metric: str, models: Iterable[str]) -> str:
    """The view's name in the Views menu (and in the links a command prints)."""
    return f"{metric} vs NFE, " + " vs ".join(models)


def _uuid(*parts: str) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, "/".join(parts)).hex


def _chart(key: str, section: str, metric: str, models: list[str], solver: str) -> dict:
    keys = [f"{model}/{metric}/{solver}" for model in models]
    return {"uuid": _uuid(key, solver), "type": "LINE", "metricSectionId": section, "deleted": False,
            "isGenerated": False, "runsCountToCompare": 10, "displayName": f"{metric} vs NFE, {solver}",
            "metricKey": keys[0], "selectedMetricKeys": keys, "xAxisKey": "step", "selectedXAxisMetricKey": "",
            "xAxisScaleType": "log", "scaleType": "linear", "yAxisKey": "metric", "yAxisExpressions": [],
            "lineSmoothness": 0, "ignoreOutliers": False, "useGlobalXaxisKey": False,
            "useGlobalLineSmoothing": False, "range": {"xMin": None, "xMax": None, "yMin": None, "yMax": None}}


def save_overlay_view(client: MlflowClient, experiment_id: str, metric: str, models: list[str],
                      solvers: list[str]) -> str | None:
    """Write (or rewrite) the view with a chart per solver overlaying ``<model>/<metric>/<solver>`` of every
    model (one line style per key, x = NFE on a log axis); returns its id (None when so many models and
    solvers do not fit in one tag: their charts of one key each remain).

    Args:
        models: the prefixes the curves were logged under (``base``, ``reflow``; the ablation's arms).
        solvers: one chart each, in this order.
    """
    key = view_key(metric, models)
    section = _uuid(key)
    state = {"compareRunCharts": [_chart(key, section, metric, models, solver) for solver in solvers],
             "compareRunSections": [{"uuid": section, "name": view_name(metric, models),
                                     "display": True, "isReordered": True, "deleted": False,
                                     "isGenerated": False}],
             "isAccordionReordered": True}
    now = int(time.time() * 1000)
    envelope = json.dumps({"name": view_name(metric, models), "createdAt": now, "updatedAt": now,
                           "state": json.dumps(state)})
    if len(envelope) > MAX_TAG_CHARS:
        return None
    client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + key, envelope)
    return key


def own_views(experiment_tags: dict[str, str]) -> dict[str, str]:
    """The views loomcfm saved on an experiment: id → name (for the links a command prints)."""
    views = {}
    for tag, value in experiment_tags.items():
        if tag.startswith(VIEW_TAG_PREFIX + OWN_PREFIX):
            views[tag.removeprefix(VIEW_TAG_PREFIX)] = json.loads(value).get("name", "")
    return views
