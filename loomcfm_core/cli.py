"""``loomcfm``: the command-line front door to the pipeline stages."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from loomcfm_core import stages
from loomcfm_core.ablation import read_comparison
from loomcfm_core.config import Config, load_config, load_config_text, preset_names
from loomcfm_core.errors import ConfigError, LoomcfmError, UriError, UsageError
from loomcfm_core.feature_store import fetch_inception_weights
from loomcfm_core.kube.rayjob import CONFIG_ENV
from loomcfm_core.pipeline_summary import read_summary_table
from loomcfm_core.processes import stop_on_signal, stopped_by
from loomcfm_core.reference.flags import add_pairs_flags, add_train_flags, flag_notes, flag_overrides, positive
from loomcfm_core.sampling import parse_method
from loomcfm_core.storage import check_uri
from loomcfm_core.tracking import tracking_uri


def _config_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=None, metavar="NAME|FILE",
                        help=f"a preset ({', '.join(preset_names())}) or a YAML file; default: the YAML text in "
                        f"${CONFIG_ENV} (how Kubernetes Jobs and RayJobs pass it), else digits")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    return common


def resolve_config(ref: str | None, overrides: list[str]) -> Config:
    if ref is None and os.environ.get(CONFIG_ENV, "").strip():
        return load_config_text(os.environ[CONFIG_ENV], overrides, origin=f"${CONFIG_ENV}")
    return load_config(ref, overrides)


def build_parser() -> argparse.ArgumentParser:
    common = _config_options()
    parser = argparse.ArgumentParser(prog="loomcfm", description="LOOM-CFM flow matching pipeline")
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="inspect configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_commands.add_parser("show", parents=[common], help="print the resolved config as YAML")
    config_commands.add_parser("presets", help="list the shipped presets")

    stage = argparse.ArgumentParser(add_help=False, parents=[common])
    stage.add_argument("--parent-run-id", default=None, metavar="ID",
                       help="record this stage as a child of that MLflow run (a pipeline's parent run)")
    commands.add_parser("cache", parents=[stage], help="cache the dataset as HDF5 shards under storage.root")
    train = commands.add_parser("train", parents=[stage], help="train on Ray Train (resumes a rerun)")
    train.add_argument("--dataset", default=None, metavar="URI",
                       help="cached dataset URI; default: data.uri, else this config's cache (built if missing)")
    train.add_argument("--wait", action="store_true", help="if another training holds the run folder, wait for "
                       "it to finish (or die) instead of failing")
    train.add_argument("--allow-change", dest="allow_changes", action="append", default=[], metavar="KEY",
                       help="a schedule key (train.lr, train.warmup_steps, ...) that may differ from the run's "
                       "checkpoint on resume; the new value is applied and recorded (repeatable)")
    train.add_argument("--launcher", choices=stages.LAUNCHERS, default="local",
                       help="local: Ray on this machine; rayjob: a KubeRay RayJob on the cluster of your kubeconfig, "
                       "shaped by the kube.* settings")
    add_train_flags(train)

    evaluate = commands.add_parser("evaluate", parents=[stage], help="FID/FD vs NFE of a checkpoint")
    evaluate.add_argument("--ckpt", required=True, metavar="URI", help="checkpoint (ours or the reference's)")
    evaluate.add_argument("--dataset", default=None, metavar="URI", help="image dataset to compare with; "
                          "default: this config's cache")
    evaluate.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                          help="solver-steps strings, e.g. euler-4 midpoint-6 dopri5-1; default: eval.methods")

    pairs = commands.add_parser("pairs", parents=[stage], help="generate reflow (noise, sample) pairs")
    pairs.add_argument("--ckpt", required=True, metavar="URI", help="checkpoint to sample from")
    add_pairs_flags(pairs)

    # The reference implementation's sample.py flags, kept so its users' commands work.
    sample = commands.add_parser("sample", parents=[common], help="write sampled PNGs and a grid")
    sample.add_argument("--ckpt", required=True, help="Path to the model checkpoint.")
    sample.add_argument("--output", required=True, help="Path to the output directory to write images to.")
    sample.add_argument("--num_images", type=positive, required=True, help="Number of images to generate.")
    sample.add_argument("--nrows", type=positive, default=8, help="nrows in make_grid.")
    sample.add_argument("--method", required=True, help="Generation method of format solver-steps.")
    sample.add_argument("--batch_size", type=positive, default=None, help="Batch size (default: sample.batch_size).")

    commands.add_parser("run", parents=[common], help="the whole pipeline: cache, train, evaluate, pairs, "
                        "reflow train, evaluate")

    pipeline = commands.add_parser("pipeline", help="Kubeflow Pipelines: compile, run locally, submit")
    pipeline_commands = pipeline.add_subparsers(dest="pipeline_command", required=True)
    pipeline_commands.add_parser("compile", help="write pipelines/compiled/*.yaml (the files to upload in the KFP UI)")
    run_opts = argparse.ArgumentParser(add_help=False, parents=[common])
    run_opts.add_argument("--pipeline", choices=["full", "reflow", "ablation"], default="full")
    run_opts.add_argument("--checkpoint", default=None, metavar="URI", help="the reflow pipeline's starting checkpoint")
    run_opts.add_argument("--launcher", choices=stages.LAUNCHERS, default="local",
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

    cluster = commands.add_parser("cluster", help="the Kubernetes cluster the RayJobs and pipelines run on")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True)
    check = cluster_commands.add_parser("check", parents=[common], help="preflight: KubeRay, RBAC, Secrets, nodes and "
                                        "a probe pod, as a table of checks; exits 1 on any failure")
    check.add_argument("--launcher", choices=stages.LAUNCHERS, default="rayjob",
                       help="what the runs will use: rayjob (default) checks KubeRay too; local only the steps' needs")
    check.add_argument("--inside", action="store_true", help="only the checks a pod makes (MLflow, storage, "
                       "/dev/shm): what the probe pod runs")
    check.add_argument("--no-probe", dest="probe", action="store_false", help="skip the probe pod")
    check.add_argument("--shm", default=None, metavar="QUANTITY", help="the /dev/shm size to expect (--inside)")

    weights = commands.add_parser("weights", help="feature-network weights for FID")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    fetch = weights_commands.add_parser("fetch", help="download the TF-Inception weights once into storage "
                                        "(needs internet access; never used by tests or the embedded run)")
    fetch.add_argument("--to", required=True, metavar="URI", help="where to put them (path or s3://...)")
    return parser


# Arguments that name a location, and whether it must be local: checked before any work, naming the flag.
LOCATION_ARGS = {"ckpt": ("--ckpt", False), "dataset": ("--dataset", False), "output": ("--output", False),
                 "checkpoint": ("--checkpoint", False), "to": ("--to", False), "pipeline_root": ("--pipeline-root", True)}


def check_locations(args: argparse.Namespace) -> None:
    """Every location argument is a URI storage takes (:func:`loomcfm_core.storage.check_uri`)."""
    for dest, (flag, local) in LOCATION_ARGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            try:
                check_uri(value, local=local)
            except UriError as exc:
                raise UsageError(f"{flag}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    check_locations(args)
    if getattr(args, "allow_changes", None):
        args.overrides.append(f"train.allow_changes={json.dumps(args.allow_changes)}")
    if args.command == "config" and args.config_command == "presets":
        print("\n".join(preset_names()))
        return 0
    if args.command == "pipeline":
        return run_pipeline_command(args)
    if args.command == "weights":
        digest = fetch_inception_weights(args.to)
        print(f"{args.to}\nsha256 {digest}\nset eval.inception_weights={args.to} (the .sha256 beside it is checked)")
        return 0
    cfg = resolve_config(args.config, args.overrides + flag_overrides(args))
    for note in flag_notes(args, tracking_uri(cfg)):
        print(note, file=sys.stderr)
    if args.command == "config":
        print(cfg.to_yaml(), end="")
        return 0
    if args.command == "cluster":
        stages.check_cluster(cfg, args.launcher, inside=args.inside, probe=args.probe, shm=args.shm)
        return 0
    if args.command == "cache":
        result = stages.cache(cfg, args.parent_run_id)
    elif args.command == "train":
        result = stages.launch_train(cfg, args.dataset, args.parent_run_id, launcher=args.launcher, wait=args.wait,
                                     resume_step=args.resume_step)
    elif args.command == "evaluate":
        result = stages.evaluate(cfg, args.ckpt, args.dataset, args.methods, args.parent_run_id)
    elif args.command == "pairs":
        result = stages.pairs(cfg, args.ckpt, args.parent_run_id, output=args.output)
    elif args.command == "sample":
        parse_method(args.method)
        result = stages.sample(cfg, args.ckpt, args.output, args.num_images, args.method,
                               args.batch_size or cfg.sample.batch_size, args.nrows)
    else:
        result = stages.run(cfg)
        print(f"\n{result.summary}\n\nBrowse the runs (parent run {result.parent_run_id}):\n"
              f"  {mlflow_ui_command(result.tracking_uri)}")
        return 0
    print(json.dumps(dataclasses.asdict(result), indent=2))
    return 0


def run_pipeline_command(args: argparse.Namespace) -> int:
    from pipelines import runner  # KFP's compiler is only needed here

    if args.pipeline_command == "compile":
        for path in runner.compile_all():
            print(path)
        return 0
    local = args.pipeline_command == "run-local"
    config = args.config or (None if local else "cluster")
    pipeline_args = runner.arguments(args.pipeline, config, args.overrides, args.checkpoint)
    if local:
        parent_run_id = runner.run_local(args.pipeline, pipeline_args, str(Path(args.pipeline_root).resolve()),
                                         args.cache, args.launcher)
        cfg = load_config_text(pipeline_args["config_yaml"], args.overrides)
        read_table = read_comparison if args.pipeline == "ablation" else read_summary_table
        print(f"\n{read_table(cfg, parent_run_id)}\n\npipeline {args.pipeline} finished; step outputs under "
              f"{args.pipeline_root}/\nBrowse the runs (parent run {parent_run_id}):\n"
              f"  {mlflow_ui_command(tracking_uri(cfg))}")
    else:
        print(runner.submit(args.host, args.pipeline, pipeline_args, args.experiment, args.schedule,
                            args.service_account, args.launcher))
    return 0


def mlflow_ui_command(uri: str) -> str:
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {uri}"


def _stop_local_ray() -> None:
    """Shut down a local Ray this command started, and what survives of it (nothing if none was started)."""
    if "ray" in sys.modules:
        from loomcfm_core.training.local_ray import stop_local_ray

        stop_local_ray()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # force: importing mlflow.pytorch already configured the root logger at ERROR, which hid every message
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop_on_signal)  # like Ctrl-C: the stage's MLflow run ends KILLED, Ray is stopped
    try:
        return run(args)
    except ConfigError as exc:
        print(f"loomcfm: config error: {exc}", file=sys.stderr)
        return 2
    except (LoomcfmError, OSError) as exc:  # a deliberate error, or the machine's (disk full, permissions)
        print(f"loomcfm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"loomcfm: stopped by {stopped_by()}", file=sys.stderr)
        return 128 + signal.Signals[stopped_by()].value
    finally:
        _stop_local_ray()


if __name__ == "__main__":
    sys.exit(main())
