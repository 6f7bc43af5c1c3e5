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
from pipelines import loomcfm_pipeline as full
from pipelines import reflow_pipeline as reflow

COMPILED = Path(__file__).resolve().parent / "compiled"
# pipeline -> (builder of the pipeline for a launcher, package file)
PIPELINES = {"full": (full.build, "loomcfm_pipeline.yaml"), "reflow": (reflow.build, "reflow_pipeline.yaml"),
             "ablation": (lambda launcher: ablation.ablation_pipeline, "ablation_pipeline.yaml")}
LAUNCHERS = ("local", "rayjob")
# The packages' defaults per platform of k8s/overlays: compiled/ is the cpu overlay's (digits: no GPU anywhere),
# compiled/gpu/ the gpu overlay's (GPUs for evaluate, pairs and training). tests/kfp/test_packages.py checks each
# against its overlay's config.
PLATFORMS = {"cpu": {}, "gpu": {"accelerator_limit": "1", "train_accelerator_limit": "1", "gpus_per_worker": 1,
                                "worker_cpu": "8", "worker_memory": "32Gi"}}


def package_path(pipeline: str, launcher: str = "local", platform: str = "cpu", root: Path = COMPILED) -> Path:
    """``<root>[/<platform>][/rayjob]/<file>``: where a pipeline's package for a launcher and platform is."""
    folder = root / ("" if platform == "cpu" else platform) / ("" if launcher == "local" else launcher)
    return folder / PIPELINES[pipeline][1]


def compile_all(out_dir: Path = COMPILED) -> list[Path]:
    """Every package: each pipeline for each launcher (the ablation trains in its steps: local only) and each
    platform whose defaults apply to it."""
    paths = []
    for platform, defaults in PLATFORMS.items():
        for pipeline, (build, _) in PIPELINES.items():
            for launcher in LAUNCHERS if pipeline != "ablation" else ("local",):
                func = build(launcher)
                accepted = {k: v for k, v in defaults.items() if k in func.component_spec.inputs}
                if defaults and not accepted:
                    continue  # nothing of this platform applies (the ablation's steps have no GPU parameter)
                path = package_path(pipeline, launcher, platform, out_dir)
                path.parent.mkdir(parents=True, exist_ok=True)
                compiler.Compiler().compile(func, str(path), pipeline_parameters=accepted)
                paths.append(path)
    return paths


def arguments(pipeline: str, config: str | None, overrides: list[str], checkpoint: str | None) -> dict:
    """Pipeline arguments, validated here first so a typo fails before anything is submitted or run."""
    if pipeline not in PIPELINES:
        raise UsageError(f"--pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")
    config_yaml = config_text(config)
    load_config_text(config_yaml, overrides)  # the validation the pipeline's prepare step repeats
    args = {"config_yaml": config_yaml, "overrides": list(overrides)}
    if pipeline == "reflow":
        if not checkpoint:
            raise UsageError("the reflow pipeline needs --checkpoint URI (a trained model's checkpoint)")
        args["checkpoint_uri"] = checkpoint
    elif checkpoint:
        raise UsageError("--checkpoint is for --pipeline reflow")
    return args


def run_local(pipeline: str, args: dict, pipeline_root: str, caching: bool = False, launcher: str = "local") -> str:
    """Run with kfp.local in this Python environment (no containers); returns the parent MLflow run's id,
    which the ``prepare`` step reported in this run's folder under ``pipeline_root``.

    The steps get a fresh ``KFP_RUN_ID`` (a cluster's pods get it from their ``pipeline/runid`` label), so
    they find this run's parent MLflow run; ``caching`` lets kfp.local reuse a step whose inputs are those of
    an earlier run under the same ``pipeline_root``.
    """
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root, enable_caching=caching)
    # the ablation's arms one after another: five local Ray clusters at once would only fight over one machine
    func = ablation.build(parallelism=1) if pipeline == "ablation" else PIPELINES[pipeline][0](launcher)
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
           service_account: str | None = None, launcher: str = "local") -> str:
    """Upload the pipeline as a version on a KFP endpoint and run it (or schedule it); returns the URL."""
    import kfp

    from pipelines import submit as uploader

    build, filename = PIPELINES[pipeline]
    func = build(launcher)
    if schedule:
        uploader.check_schedule(schedule)  # before the client, which already asks the server at creation
    return uploader.submit(kfp.Client(host=host), host, func, filename, args, experiment, schedule, service_account)
