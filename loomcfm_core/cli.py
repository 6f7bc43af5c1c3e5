"""``loomcfm``: the command-line front door to the pipeline stages."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from loomcfm_core import stages
from loomcfm_core.config import ConfigError, load_config, preset_names
from loomcfm_core.data.sources import SourceError
from loomcfm_core.storage import StorageError


def _config_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=None, metavar="NAME|FILE",
                        help=f"a preset ({', '.join(preset_names())}) or a YAML file; default: digits")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _config_options()
    parser = argparse.ArgumentParser(prog="loomcfm", description="LOOM-CFM flow matching pipeline")
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="inspect configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_commands.add_parser("show", parents=[common], help="print the resolved config as YAML")
    config_commands.add_parser("presets", help="list the shipped presets")

    commands.add_parser("cache", parents=[common], help="cache the dataset as HDF5 shards under storage.root")
    train = commands.add_parser("train", parents=[common], help="train on Ray Train (resumes a rerun)")
    train.add_argument("--dataset", default=None, metavar="URI",
                       help="cached dataset URI; default: data.uri, else this config's cache (built if missing)")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "config" and args.config_command == "presets":
        print("\n".join(preset_names()))
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.command == "config":
        print(cfg.to_yaml(), end="")
    elif args.command == "cache":
        print(json.dumps(stages.cache(cfg), indent=2))
    elif args.command == "train":
        print(json.dumps(stages.train(cfg, args.dataset), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except ConfigError as exc:
        print(f"loomcfm: config error: {exc}", file=sys.stderr)
        return 2
    except (SourceError, StorageError) as exc:
        print(f"loomcfm: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
