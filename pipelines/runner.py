"""Compile, run locally (``kfp.local``) or submit the pipelines; what ``loomcfm pipeline ...`` calls."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from kfp import compiler

from loomcfm_core.config import config_text, load_config_text
from loomcfm_core.errors import UsageError
from pipelines import ablation_pipeline as ablation
from pipelines.loomcfm_pipeline import loomcfm_pipeline
from pipelines.reflow_pipeline import reflow_pipeline

COMPILED = Path(__file__).resolve().parent / "compiled"
PIPELINES = {"full": (loomcfm_pipeline, "loomcfm_pipeline.yaml"), "reflow": (reflow_pipeline, "reflow_pipeline.yaml"),
             "ablation": (ablation.ablation_pipeline, "ablation_pipeline.yaml")}
# kfp.local on one machine: the ablation's arms one after another (five local Ray clusters at once would only
# fight over its cores); the compiled package runs them in parallel.
LOCAL = {"ablation": ablation.build(parallelism=1)}


def compile_all(out_dir: Path = COMPILED) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for func, filename in PIPELINES.values():
        compiler.Compiler().compile(func, str(out_dir / filename))
        paths.append(out_dir / filename)
    return paths


def arguments(pipeline: str, config: str | None, overrides: list[str], checkpoint: str | None,
              launcher: str = "local") -> dict:
    """Pipeline arguments, validated here first so a typo fails before anything is submitted or run."""
    if pipeline not in PIPELINES:
        raise UsageError(f"--pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")
    config_yaml = config_text(config)
    load_config_text(config_yaml, overrides)  # the validation the pipeline's prepare step repeats
    args = {"config_yaml": config_yaml, "overrides": list(overrides)}
    if pipeline != "ablation":  # the ablation's arms train in their step
        args["launcher"] = launcher
    if pipeline == "reflow":
        if not checkpoint:
            raise UsageError("the reflow pipeline needs --checkpoint URI (a trained model's checkpoint)")
        args["checkpoint_uri"] = checkpoint
    elif checkpoint:
        raise UsageError("--checkpoint is for --pipeline reflow")
    return args


def run_local(pipeline: str, args: dict, pipeline_root: str) -> str:
    """Run with kfp.local in this Python environment (no containers); returns the parent MLflow run's id,
    which the ``prepare`` step reported in this run's folder under ``pipeline_root``."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root)
    func = LOCAL.get(pipeline, PIPELINES[pipeline][0])
    before = set(Path(pipeline_root).glob("*/prepare/executor_output.json"))
    func(**args)
    (output,) = set(Path(pipeline_root).glob("*/prepare/executor_output.json")) - before
    return json.loads(output.read_text())["parameterValues"]["parent_run_id"]


def submit(host: str, pipeline: str, args: dict, experiment: str | None = None) -> str:
    """Create a run on a KFP endpoint from the freshly compiled package; returns the run's URL."""
    import kfp

    func, filename = PIPELINES[pipeline]
    client = kfp.Client(host=host)
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / filename
        compiler.Compiler().compile(func, str(package))
        run = client.create_run_from_pipeline_package(str(package), arguments=args, experiment_name=experiment)
    return f"{host.rstrip('/')}/#/runs/details/{run.run_id}"
