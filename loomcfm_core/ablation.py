"""The paper's coupling ablation in one pipeline run: the same config trained with each coupling, evaluated
at the same methods, and compared in one plot (distance vs NFE, a curve per coupling) and one table.

Arms: ``independent`` (I-CFM), ``minibatch_ot`` (OT-CFM), ``fixed`` (fixed random pairs), ``loom`` and
``loom_converge`` (LOOM after ``coupling.converge_epochs`` passes of reassignment with no network: the
config's value, else :data:`DEFAULT_CONVERGE_EPOCHS`); ``ablation.arms`` picks which run. Each arm trains
under its own name (``<name>-<arm>``: its own run folder and registered model, so the ablation never moves the
config's ``base`` alias) but in the config's MLflow experiment, as a child run of the pipeline's parent.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from loomcfm_core import tracking
from loomcfm_core.choices import ABLATION_ARMS
from loomcfm_core.config import Config, TrackingConfig
from loomcfm_core.errors import UsageError
from loomcfm_core.evaluation.plot import plot_fd_vs_nfe
from loomcfm_core.evaluation.summary import log_curves
from loomcfm_core.results import MethodResult

LABELS = {"loom_converge": "loom + convergence"}
DEFAULT_CONVERGE_EPOCHS = 5
FILES = ("ablation.md", "ablation.html", "ablation.png")


def arm_config(cfg: Config, arm: str) -> Config:
    """The config of one arm: the coupling (and convergence) it tests, its own name, the parent's experiment."""
    if arm not in ABLATION_ARMS:
        raise UsageError(f"ablation arm must be one of {', '.join(ABLATION_ARMS)}, got {arm!r}")
    tree = cfg.model_dump(mode="json")
    converge = cfg.coupling.converge_epochs or DEFAULT_CONVERGE_EPOCHS
    tree["coupling"].update(kind="loom" if arm == "loom_converge" else arm,
                            converge_epochs=converge if arm == "loom_converge" else 0)
    tree["name"] = f"{cfg.name}-{arm}"
    tree["train"]["run_name"] = None
    tree["tracking"]["experiment"] = cfg.experiment
    return Config.model_validate(tree)


@dataclass
class ArmSpec:
    """What one arm's KFP step needs, as the one item of the pipeline's ``ParallelFor`` (kfp 2.17's local
    runner hands a loop task the loop item in place of every other task output it consumes)."""

    config_yaml: str
    arm: str
    dataset_uri: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ArmSpec:
        return cls(**json.loads(text))


def plan(cfg: Config, dataset_uri: str) -> list[str]:
    """The arms of an ablation run (``ablation.arms``), one JSON :class:`ArmSpec` each (no parent run id: each
    step finds its pipeline run's parent itself, so the plan stays a pure function of its inputs that KFP may
    reuse)."""
    return [ArmSpec(cfg.to_yaml(), arm, dataset_uri).to_json() for arm in cfg.ablation.arms]


@dataclass
class ArmResult:
    """One arm's evaluation: the JSON a KFP step hands the report step."""

    arm: str
    metric: str
    checkpoint_uri: str
    rows: list[MethodResult]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ArmResult:
        data = json.loads(text)
        return cls(data["arm"], data["metric"], data["checkpoint_uri"], [MethodResult(**r) for r in data["rows"]])


def comparison_table(arms: list[ArmResult]) -> str:
    """A Markdown table: one row per coupling, distance (and NFE) per method."""
    metric = arms[0].metric
    methods = list(dict.fromkeys(r.method for arm in arms for r in arm.rows))
    lines = [f"| coupling | {' | '.join(f'{metric} {m}' for m in methods)} |", "|---" * (len(methods) + 1) + "|"]
    for arm in arms:
        by_method = {r.method: r for r in arm.rows}
        cells = [f"{by_method[m].distance:.3f} (NFE {by_method[m].nfe:g})" if m in by_method else "-" for m in methods]
        lines.append(f"| {LABELS.get(arm.arm, arm.arm)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def html_report(table: str, plot: Path) -> str:
    """The table and the plot (inlined) as one HTML page, for the KFP UI and the MLflow artifact view."""
    header, _, *rows = [line.strip("|").split("|") for line in table.splitlines()]
    cells = "".join(f"<th>{html.escape(c.strip())}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>" for row in rows)
    image = base64.b64encode(plot.read_bytes()).decode()
    return (f"<html><body><h2>Coupling ablation</h2><table border='1' cellpadding='4'><tr>{cells}</tr>{body}"
            f"</table><p><img alt='distance vs NFE' src='data:image/png;base64,{image}'/></p></body></html>")


def record_comparison(settings: TrackingConfig, parent_run_id: str, arms: list[ArmResult],
                      workdir: Path) -> dict[str, Path]:
    """Draw and write the comparison into ``workdir`` and log it to the parent run in the store of
    ``settings`` (the ``tracking`` section): the files, the table as the run's description, and each arm's
    curve ``<arm>/<metric>/<solver>`` (step = NFE); returns the files by name."""
    arms = sorted(arms, key=lambda a: ABLATION_ARMS.index(a.arm))
    if len({a.metric for a in arms}) != 1:
        raise UsageError(f"ablation arms were scored with different metrics: {sorted({a.metric for a in arms})}")
    metric = arms[0].metric
    table = comparison_table(arms)
    files = dict(zip(FILES, (workdir / name for name in FILES)))
    plot_fd_vs_nfe({LABELS.get(a.arm, a.arm): a.rows for a in arms}, metric, files["ablation.png"])
    files["ablation.md"].write_text(f"**{metric} vs NFE per coupling**\n\n{table}\n")
    files["ablation.html"].write_text(html_report(table, files["ablation.png"]))
    client = MlflowClient(tracking.tracking_uri(settings))
    log_curves(client, parent_run_id, metric, {arm.arm: arm.rows for arm in arms})
    client.set_tag(parent_run_id, tracking.NOTE_TAG, files["ablation.md"].read_text())
    for path in files.values():
        client.log_artifact(parent_run_id, str(path), "ablation")
    return files


def read_comparison(settings: TrackingConfig, parent_run_id: str) -> str:
    """The comparison table an ablation recorded on its parent run (for ``loomcfm pipeline run-local``)."""
    return tracking.load_text(settings, parent_run_id, f"ablation/{FILES[0]}").rstrip("\n")
