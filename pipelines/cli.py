"""``loomcfm pipeline compile | run-local | submit``: the subcommands the pipelines add to the ``loomcfm`` CLI.

They reach the CLI through the entry point ``pipeline`` of the group ``loomcfm.commands`` (pyproject.toml),
which the CLI reads from the installed metadata, so the library never imports its front doors. This module
stays light: KFP's compiler and local runner are imported only when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loomcfm_core.ablation import read_comparison
from loomcfm_core.choices import LAUNCHERS
from loomcfm_core.cli import check_locations
from loomcfm_core.config import load_config_text
from loomcfm_core.evaluation.summary import read_summary_table
from loomcfm_core.tracking import tracking_uri, ui_command

LOCATIONS = {"checkpoint": ("--checkpoint", False), "pipeline_root": ("--pipeline-root", True)}


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``pipeline`` and its subcommands to the CLI's ``commands``; ``common`` holds ``--config``/``--set``."""
    pipeline = commands.add_parser("pipeline", help="Kubeflow Pipelines: compile, run locally, submit")
    pipeline.set_defaults(handler=run)
    pipeline_commands = pipeline.add_subparsers(dest="pipeline_command", required=True)
    pipeline_commands.add_parser("compile", help="write pipelines/compiled/*.yaml (the files to upload in the KFP UI)")
    run_opts = argparse.ArgumentParser(add_help=False, parents=[common])
    run_opts.add_argument("--pipeline", choices=["full", "reflow", "ablation"], default="full")
    run_opts.add_argument("--checkpoint", default=None, metavar="URI", help="the reflow pipeline's starting checkpoint")
    run_opts.add_argument("--launcher", choices=LAUNCHERS, default="local",
                          help="train in the step (local Ray) or as a KubeRay RayJob")
    local = pipeline_commands.add_parser("run-local", parents=[run_opts], help="run with kfp.local (no cluster)")
    local.add_argument("--pipeline-root", default="kfp-local", help="where kfp.local keeps step outputs (a local "
                       "folder)")
    local.add_argument("--cache", action="store_true", help="reuse steps whose inputs match an earlier run under "
                       "the same --pipeline-root (as KFP caching does on a cluster)")
    submit = pipeline_commands.add_parser("submit", parents=[run_opts], help="upload the pipeline as a version "
                                          "(<package version>-g<git commit>) and run it on a KFP endpoint; "
                                          "--config defaults to the cluster preset")
    submit.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    submit.add_argument("--experiment", default=None, help="KFP experiment name (default: the pipeline's name)")
    submit.add_argument("--schedule", default=None, metavar="CRON", help="a recurring run instead: six fields, "
                        "seconds first, e.g. '0 0 2 * * *' (02:00 daily), or @daily / @every 6h")
    submit.add_argument("--service-account", default=None, help="Kubernetes service account of the run's pods "
                        "(default: the KFP server's)")


def run(args: argparse.Namespace) -> int:
    """Run a ``pipeline`` subcommand; returns the exit code."""
    check_locations(args, LOCATIONS)
    from pipelines import runner  # KFP's compiler is only needed here

    if args.pipeline_command == "compile":
        for path in runner.compile_all():
            print(path)
        return 0
    local = args.pipeline_command == "run-local"
    config = args.config or (None if local else "cluster")
    pipeline_args = runner.arguments(args.pipeline, config, args.overrides, args.checkpoint)
    if not local:
        print(runner.submit(args.host, args.pipeline, pipeline_args, args.experiment, args.schedule,
                            args.service_account, args.launcher))
        return 0
    parent_run_id = runner.run_local(args.pipeline, pipeline_args, str(Path(args.pipeline_root).resolve()), args.cache,
                                     args.launcher)
    settings = load_config_text(pipeline_args["config_yaml"], args.overrides).tracking
    read_table = read_comparison if args.pipeline == "ablation" else read_summary_table
    print(f"\n{read_table(settings, parent_run_id)}\n\npipeline {args.pipeline} finished; step outputs under "
          f"{args.pipeline_root}/\nBrowse the runs (parent run {parent_run_id}):\n"
          f"  {ui_command(tracking_uri(settings))}")
    return 0
