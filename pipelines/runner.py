"""Compile, run locally (``kfp.local``) or submit the pipelines; what ``loomcfm pipeline ...`` calls."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from kfp import compiler

from loomcfm_core.config import config_text, load_config_text
from loomcfm_core.errors import UsageError
from loomcfm_core.kfp_env import RUN_ID_ENV
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


def run_local(pipeline: str, args: dict, pipeline_root: str, caching: bool = False) -> str:
    """Run with kfp.local in this Python environment (no containers); returns the parent MLflow run's id,
    which the ``prepare`` step reported in this run's folder under ``pipeline_root``.

    The steps get a fresh ``KFP_RUN_ID`` (a cluster's pods get it from their ``pipeline/runid`` label), so
    they find this run's parent MLflow run; ``caching`` lets kfp.local reuse a step whose inputs are those of
    an earlier run under the same ``pipeline_root``.
    """
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root, enable_caching=caching)
    func = LOCAL.get(pipeline, PIPELINES[pipeline][0])
    previous = os.environ.get(RUN_ID_ENV)
    os.environ[RUN_ID_ENV] = f"local-{uuid.uuid4()}"
    before = set(Path(pipeline_root).glob("*/prepare/executor_output.json"))
    try:
        func(**args)
    finally:
        if previous is None:
            os.environ.pop(RUN_ID_ENV, None)
        else:
            os.environ[RUN_ID_ENV] = previous
    (output,) = set(Path(pipeline_root).glob("*/prepare/executor_output.json")) - before
    return json.loads(output.read_text())["parameterValues"]["parent_run_id"]


def submit(host: str, pipeline: str, args: dict, experiment: str | None = None, schedule: str | None = None,
           service_account: str | None = None) -> str:
    """Upload the pipeline as a version on a KFP endpoint and run it (or schedule it); returns the URL."""
    import kfp

    from pipelines import submit as uploader

    func, filename = PIPELINES[pipeline]
    if schedule:
        uploader.check_schedule(schedule)  # before the client, which already asks the server at creation
    return uploader.submit(kfp.Client(host=host), host, func, filename, args, experiment, schedule, service_account)
