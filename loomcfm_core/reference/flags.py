"""The reference implementation's command-line flags on our commands, beside our own options.

Its users type ``train.py --run-name X --num-gpus 4 --resume-step 5000 --random-seed 1 --wandb``,
``generate_pairs.py --ckpt C --output O --num_images N --method M --batch_size B`` and
``evaluate.py --config Y --ckpt C``; ``loomcfm train``, ``loomcfm pairs`` and ``loomcfm evaluate`` take the
same flags. Each becomes a config override (so the config's checks name the key) or an argument of the stage.
"""

from __future__ import annotations

import argparse

from loomcfm_core.errors import UsageError

REFERENCE = "the reference implementation's flags"
# flag dest -> the config key it sets (values that need no translation)
TRAIN_KEYS = {"run_name": "train.run_name", "random_seed": "train.seed"}
PAIRS_KEYS = {"num_images": "reflow.num_pairs", "method": "reflow.method", "batch_size": "sample.batch_size"}


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(f"{REFERENCE} (train.py)")
    group.add_argument("--run-name", default=None, metavar="NAME", help="sets train.run_name: the run's folder "
                       "under <storage.root>/runs/ (a rerun with the same name resumes)")
    group.add_argument("--num-gpus", type=positive, default=None, metavar="N",
                       help="N Ray Train workers with a GPU each (ray.num_workers=N, ray.use_gpu=true); "
                       "train.batch_size is per worker, like the reference's per-process batch")
    group.add_argument("--resume-step", type=int, default=None, metavar="S",
                       help="resume from step S's checkpoint instead of the latest (-1: the latest); later "
                       "checkpoints are moved aside to <run>/set-aside/")
    group.add_argument("--random-seed", type=int, default=None, metavar="SEED", help="sets train.seed")
    group.add_argument("--wandb", action="store_true", help="accepted; tracking is MLflow (a note is printed)")


def add_pairs_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(f"{REFERENCE} (generate_pairs.py)")
    group.add_argument("--output", default=None, metavar="URI", help="write the pairs dataset there instead of "
                       "<storage.root>/datasets/<name>-pairs-<hash>")
    group.add_argument("--num_images", type=positive, default=None, metavar="N", help="sets reflow.num_pairs")
    group.add_argument("--method", default=None, metavar="METHOD", help="sets reflow.method (solver-steps)")
    group.add_argument("--batch_size", type=positive, default=None, metavar="B",
                       help="generation batch (sets sample.batch_size)")


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides the reference flags given on this command stand for (``--set`` form)."""
    keys = {"train": TRAIN_KEYS, "pairs": PAIRS_KEYS}.get(args.command, {})
    out = [f"{key}={getattr(args, dest)}" for dest, key in keys.items() if getattr(args, dest, None) is not None]
    if getattr(args, "num_gpus", None) is not None:
        if getattr(args, "launcher", "local") == "rayjob":  # cluster_config derives ray.* from kube.*
            raise UsageError("--num-gpus sets ray.num_workers and ray.use_gpu, which a RayJob (--launcher rayjob) "
                             "takes from kube.ray_workers x kube.gpus_per_worker: set those instead")
        out += [f"ray.num_workers={args.num_gpus}", "ray.use_gpu=true"]
    return out


def flag_notes(args: argparse.Namespace, tracking_uri: str) -> list[str]:
    """One-line notes for flags that have no effect here."""
    if getattr(args, "wandb", False):
        return [f"--wandb: tracking is MLflow, not Weights & Biases; this run logs to {tracking_uri}"]
    return []
