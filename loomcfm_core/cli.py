"""``loomcfm``: the command-line front door to the pipeline stages.

Other packages add subcommands through the entry point group ``loomcfm.commands`` (the ``pipeline`` commands
come from ``pipelines/cli.py`` this way, so the library never imports its front doors): each entry point is a
``register(commands, common)`` that adds its parser to ``commands`` (with ``common``, the ``--config`` and
``--set`` options, as a parent where it takes a config) and sets its ``handler(args) -> exit code``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable
from importlib import metadata

from loomcfm_core import stages
from loomcfm_core.choices import LAUNCHERS, parse_method
from loomcfm_core.config import Config, load_config, load_config_text, preset_names
from loomcfm_core.errors import ConfigError, LoomcfmError, UriError, UsageError
from loomcfm_core.evaluation.feature_weights import fetch_inception_weights
from loomcfm_core.kube.rayjob import CONFIG_ENV
from loomcfm_core.offline import stay_offline
from loomcfm_core.processes import stop_on_signal, stopped_by
from loomcfm_core.reference.flags import add_pairs_flags, add_train_flags, flag_notes, flag_overrides, positive
from loomcfm_core.storage import check_uri
from loomcfm_core.tracking import browse_text, tracking_uri

COMMANDS_GROUP = "loomcfm.commands"  # entry points that add subcommands


def command_plugins() -> list[metadata.EntryPoint]:
    """The installed entry points of :data:`COMMANDS_GROUP` (the ``pipeline`` commands, among them)."""
    return sorted(metadata.entry_points(group=COMMANDS_GROUP), key=lambda entry: entry.name)


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


def build_parser(plugins: Iterable[metadata.EntryPoint] | None = None) -> argparse.ArgumentParser:
    """The ``loomcfm`` parser: the stage commands, and those the ``plugins`` add (default: the installed
    :func:`command_plugins`)."""
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
    train.add_argument("--launcher", choices=LAUNCHERS, default="local",
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

    cluster = commands.add_parser("cluster", help="the Kubernetes cluster the RayJobs and pipelines run on")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True)
    check = cluster_commands.add_parser("check", parents=[common], help="preflight: KubeRay, RBAC, Secrets, nodes and "
                                        "a probe pod, as a table of checks; exits 1 on any failure")
    check.add_argument("--launcher", choices=LAUNCHERS, default="rayjob",
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
    for plugin in command_plugins() if plugins is None else plugins:
        plugin.load()(commands, common)
    return parser


# Arguments that name a location, and whether it must be local: checked before any work, naming the flag.
LOCATION_ARGS = {"ckpt": ("--ckpt", False), "dataset": ("--dataset", False), "output": ("--output", False),
                 "to": ("--to", False)}


def check_locations(args: argparse.Namespace, locations: dict[str, tuple[str, bool]] | None = None) -> None:
    """Every location argument is a URI storage takes (:func:`loomcfm_core.storage.check_uri`).

    Args:
        locations: ``{dest: (flag, local only)}``; default: :data:`LOCATION_ARGS` (a plugin names its own).
    """
    for dest, (flag, local) in (LOCATION_ARGS if locations is None else locations).items():
        value = getattr(args, dest, None)
        if value is not None:
            try:
                check_uri(value, local=local)
            except UriError as exc:
                raise UsageError(f"{flag}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    if getattr(args, "handler", None):  # a plugin's command
        return args.handler(args)
    check_locations(args)
    if getattr(args, "allow_changes", None):
        args.overrides.append(f"train.allow_changes={json.dumps(args.allow_changes)}")
    if args.command == "config" and args.config_command == "presets":
        print("\n".join(preset_names()))
        return 0
    if args.command == "weights":
        digest = fetch_inception_weights(args.to)
        print(f"{args.to}\nsha256 {digest}\nset eval.inception_weights={args.to} (the .sha256 beside it is checked)")
        return 0
    cfg = resolve_config(args.config, args.overrides + flag_overrides(args))
    for note in flag_notes(args, tracking_uri(cfg.tracking)):
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
        result = stages.train(cfg, args.dataset, args.parent_run_id, launcher=args.launcher, wait=args.wait,
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
        print(f"\n{result.summary}\n\nSample grids and FD-vs-NFE plots:\n  base:   {result.base_eval.eval_uri}\n"
              f"  reflow: {result.reflow_eval.eval_uri}\n\n"
              f"{browse_text(cfg.tracking, cfg.experiment, result.parent_run_id)}")
        return 0
    print(json.dumps(dataclasses.asdict(result), indent=2))
    return 0


def _stop_local_ray() -> None:
    """Shut down a local Ray this command started, and what survives of it (nothing if none was started)."""
    if "ray" in sys.modules:
        from loomcfm_core.training.local_ray import stop_local_ray

        stop_local_ray()


def main(argv: list[str] | None = None) -> int:
    stay_offline()  # this process and every one it starts (a local Ray, kfp.local's steps)
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
