"""Reference YAML configs (``configs/*.yaml`` of the reference implementation), recognised by their
structure and translated into our config tree.

The reference's sections are ``name``, ``data``, ``model``, ``training``, ``evaluation``; ours never have
``training``/``evaluation``, ``model.ch`` or ``data.data_root``. Every key is either mapped to ours
(with its transform: attention *rates* become feature-map *sizes*, ``num_caches`` becomes
``coupling.num_seeds``, ``train_after`` becomes ``coupling.converge_epochs`` and is taken out of the epoch
count, ``ae_config`` and ``ae_checkpoint`` become ``model.autoencoder``, whose latents are then what
``in_channels`` and ``input_size`` describe, ...), accepted because its value is what our code does anyway, or listed as not mapped with the
reason — never dropped silently. Relative data paths are resolved against the working directory, as the
reference (run from its repository root) reads them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
SECTIONS = {"name", "data", "model", "training", "evaluation"}
# the reference's data.name (by prefix) -> our source kind, and the folder under data_root it reads
DATA_KINDS = {"cifar10": ("cifar10", "train/cifar-10-batches-py"), "imagenet": ("imagenet32", ""),
              "imagefolder": ("imagefolder", ""), "h5": ("hdf5", "")}
# the reference's model.ae_config -> (model.autoencoder.kind, downsample, latent channels): its LDM first stages
# (an f8 KL, f8 and f16 VQ), all encoding RGB images
AUTOENCODERS = {"kl_f8": ("kl", 8, 4), "vq_f8": ("vq", 8, 4), "vq_f16": ("vq", 16, 8)}
# keys whose value is what our code does anyway (reference key -> the value that is fine)
SAME_AS_OURS = {"model.resamp_with_conv": True, "training.t_dist": "uniform", "training.source": "normal",
                "training.use_fp16": False, "training.optimizer.optimizer": "Adam", "training.optimizer.scheduler_p": 0.0,
                "training.loss_weights.flow_matching_loss": 1.0, "evaluation.type": "FID", "evaluation.use_fp16": False,
                "evaluation.source": "normal"}
# keys the reference reads but that change nothing here, with why
IGNORED = {"training.attracting": "never read by the reference",
           "training.loss_weights.curvature_loss": "never used by the reference's loss",
           "training.coupling_params.cache_dir": "our seed table lives in the checkpoints",
           "evaluation.batching.num_workers": "evaluation reads the cached shards in the process",
           "evaluation.num_real_samples_for_fid": "we compare with the whole reference split's statistics",
           "data.image_size": "never read by the reference (model.input_size sets the size)"}


def is_reference_config(tree: dict[str, Any]) -> bool:
    """Whether a YAML tree is a reference config: only its sections, and a key only it has."""
    if not tree or not set(tree) <= SECTIONS:
        return False
    model, data = tree.get("model") or {}, tree.get("data") or {}
    return "training" in tree or "evaluation" in tree or "ch" in model or "data_root" in data


@dataclass
class Translation:
    """Our config tree, what each reference key became, and the keys not mapped (dotted key, value, why)."""

    tree: dict[str, Any] = field(default_factory=dict)
    mapped: list[tuple[str, str, Any]] = field(default_factory=list)
    unmapped: list[tuple[str, Any, str]] = field(default_factory=list)

    def set(self, source: str, key: str, value: Any) -> None:
        node = self.tree
        *sections, leaf = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
        self.mapped.append((source, key, value))

    def skip(self, source: str, value: Any, why: str) -> None:
        self.unmapped.append((source, value, why))

    def report(self, origin: str) -> str:
        lines = [f"{origin}: a reference implementation config, translated:"]
        lines += [f"  {source} -> {key} = {value!r}" for source, key, value in self.mapped]
        if self.unmapped:
            lines.append("  not mapped:")
            lines += [f"  {source} = {value!r}: {why}" for source, value, why in self.unmapped]
        return "\n".join(lines)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif value is not None or f"{prefix}{key}" != "training.coupling_params":
            out[f"{prefix}{key}"] = value
    return out


def _path(root: str) -> str:
    return str((Path.cwd() / Path(root).expanduser()).resolve())


def _data_source(name: str, root: str) -> str | None:
    for prefix, (kind, sub) in DATA_KINDS.items():
        if name.startswith(prefix):
            return f"{kind}:{_path(root)}" + (f"/{sub}" if sub else "")
    return None


def _method(step: Any) -> str | None:
    if isinstance(step, int):
        return f"euler-{step}"
    return step if isinstance(step, str) else None


def _autoencoder(flat: dict, out: Translation, take) -> tuple[str, int, int] | None:
    """``model.ae_config`` + ``model.ae_checkpoint`` -> ``model.autoencoder`` (and RGB images); returns the
    autoencoder's (kind, downsample, latent channels), None for a pixel-space model."""
    name, weights = take("model.ae_config"), take("model.ae_checkpoint")
    if name is None and weights is None:
        return None
    latent = AUTOENCODERS.get(name)
    if weights is None:  # the reference builds its autoencoder only when it has a checkpoint to load
        out.skip("model.ae_config", name, "the reference builds no autoencoder without model.ae_checkpoint: "
                 "a pixel-space model")
        return None
    if latent is None:
        out.skip("model.ae_checkpoint", weights, f"model.ae_config={name!r} is none of the reference's "
                 f"autoencoders ({', '.join(AUTOENCODERS)})")
        return None
    kind, downsample, channels = latent
    out.set("model.ae_config", "model.autoencoder.kind", kind)
    out.set("model.ae_config", "model.autoencoder.downsample", downsample)
    out.set("model.ae_config", "model.autoencoder.latent_channels", channels)
    out.set("model.ae_config", "data.channels", 3)
    out.set("model.ae_checkpoint", "model.autoencoder.weights", _path(weights))
    return latent


def translate(tree: dict[str, Any], origin: str = "config") -> Translation:
    """Our config tree for a reference config (``tree``), with the mapping and the unmapped keys."""
    flat, out = _flat(tree), Translation()
    done: set[str] = set()

    def take(key: str, default: Any = None) -> Any:
        done.add(key)
        return flat.get(key, default)

    reflow = str(take("data.name", "")).startswith("reflow_")
    base_name = str(flat.get("data.name", "")).removeprefix("reflow_")
    if "name" in flat:
        out.set("name", "name", take("name"))
    if base_name:
        out.set("data.name", "data.name", base_name)
    root = take("data.data_root")
    if reflow:  # trains on the pairs generate_pairs.py wrote; its eval_data_root holds the images they imitate
        out.set("data.name", "coupling.kind", "pairs")
        if root:
            out.set("data.data_root", "data.source", f"pairs:{_path(root)}")
        if "data.eval_data_root" in flat:
            out.skip("data.eval_data_root", take("data.eval_data_root"), "the images to compare with: evaluate the "
                     "reflowed checkpoint with the base model's config (e.g. its _eval.yaml)")
    elif root and (source := _data_source(base_name, root)):
        out.set("data.data_root", "data.source", source)
    elif root:
        out.skip("data.name", flat.get("data.name"), f"no reader of ours for {base_name!r} (cifar10, imagenet*, "
                 "imagefolder*, h5*)")
    if "data.random_flip" in flat:
        out.set("data.random_flip", "data.hflip", bool(take("data.random_flip")) and not reflow)

    size, channels = take("model.input_size"), take("model.in_channels")
    latent = _autoencoder(flat, out, take)
    if channels is not None and latent is None:
        out.set("model.in_channels", "data.channels", channels)
    elif channels is not None and channels != latent[2]:
        out.skip("model.in_channels", channels, f"{flat['model.ae_config']} latents have {latent[2]} channels")
    if size is not None:
        out.set("model.input_size", "data.resolution", size * (latent[1] if latent else 1))
    if take("model.out_ch", channels) != channels:
        out.skip("model.out_ch", flat["model.out_ch"], "our network outputs as many channels as it takes")
    for ours, theirs in (("channels", "ch"), ("channel_mult", "ch_mult"), ("num_res_blocks", "num_res_blocks"),
                         ("dropout", "dropout")):
        if f"model.{theirs}" in flat:
            out.set(f"model.{theirs}", f"model.{ours}", take(f"model.{theirs}"))
    heads = take("model.num_head_channels")
    if heads == -1:
        out.skip("model.num_head_channels", heads, "a fixed head count (model.num_heads) is not implemented")
    elif heads is not None:
        out.set("model.num_head_channels", "model.num_head_channels", heads)
    if "model.num_heads" in flat:
        out.skip("model.num_heads", take("model.num_heads"), "ignored by the reference when num_head_channels is set")
    rates = take("model.attn_resolutions")
    if rates is not None and size:
        levels = len(flat.get("model.ch_mult") or [1])
        used = [r for r in rates if r in {2**k for k in range(levels)}]
        out.set("model.attn_resolutions", "model.attn_resolutions", [size // r for r in used])
        if len(used) < len(rates):
            out.skip("model.attn_resolutions", rates, f"rates {sorted(set(rates) - set(used))} are no downsampling "
                     "rate of this network (the reference ignores them too)")
    if "model.init_from_checkpoint" in flat:
        out.set("model.init_from_checkpoint", "train.init_from", _path(take("model.init_from_checkpoint")))

    _training(flat, out, take, reflow)
    _evaluation(flat, out, take)
    for key, fine in SAME_AS_OURS.items():
        if key in flat and take(key) != fine:
            out.skip(key, flat[key], f"only {fine!r} is implemented")
    for key, why in IGNORED.items():
        if key in flat:
            out.skip(key, take(key), why)
    for key in sorted(set(flat) - done):
        out.skip(key, flat[key], "not a reference key this translator knows")
    log.info("%s\n  (relative data paths resolved against the working directory %s)", out.report(origin), Path.cwd())
    return out


def _training(flat: dict, out: Translation, take, reflow: bool) -> None:
    if not any(key.startswith("training.") for key in flat):
        return
    after, epochs = take("training.train_after", 0) or 0, take("training.num_epochs")
    resample = take("training.resample_every", epochs)
    kind = {"ot_cached_seed": "loom", "ot": "minibatch_ot", "independent": "independent"}.get(take("training.coupling"))
    if kind == "loom" and take("training.coupling_params.no_swaps", False):
        kind = "fixed"
    if kind == "loom" and resample == 1:
        kind = "minibatch_ot"
    elif epochs is not None and resample is not None and resample < epochs:
        out.skip("training.resample_every", resample, "redrawing every seed every few epochs is not implemented")
    if kind is None:
        out.skip("training.coupling", flat.get("training.coupling"), "couplings of ours: ot_cached_seed, ot, independent")
    elif not reflow:
        out.set("training.coupling", "coupling.kind", kind)
    if "training.coupling_params.num_caches" in flat:
        out.set("training.coupling_params.num_caches", "coupling.num_seeds", take("training.coupling_params.num_caches"))
    if after:
        out.set("training.train_after", "coupling.converge_epochs", after)
    if epochs is not None:
        out.set("training.num_epochs", "train.epochs", epochs - after)
    sigma = take("training.sigma")
    if sigma is not None:
        out.set("training.sigma", "train.sigma", float(sigma))
    if take("training.target_sigma", sigma) != sigma:
        out.skip("training.target_sigma", flat["training.target_sigma"], "a different sigma at t=1 is not implemented")
    for theirs, ours in (("ema_decay", "ema_decay"), ("batching.batch_size", "batch_size"),
                         ("optimizer.learning_rate", "lr"), ("optimizer.weight_decay", "weight_decay"),
                         ("optimizer.grad_clip", "grad_clip"), ("optimizer.num_warmup_steps", "warmup_steps")):
        if f"training.{theirs}" in flat:
            value = take(f"training.{theirs}")
            out.set(f"training.{theirs}", f"train.{ours}", float(value) if ours in ("lr", "weight_decay") else value)
            if reflow and ours in ("batch_size", "lr", "warmup_steps"):
                out.set(f"training.{theirs}", f"reflow.{ours}", out.mapped[-1][2])
    if "training.batching.num_workers" in flat:
        out.set("training.batching.num_workers", "data.num_workers", take("training.batching.num_workers"))


def _evaluation(flat: dict, out: Translation, take) -> None:
    if "evaluation.batching.batch_size" in flat:
        out.set("evaluation.batching.batch_size", "eval.batch_size", take("evaluation.batching.batch_size"))
    if "evaluation.num_samples_for_fid" in flat:
        out.set("evaluation.num_samples_for_fid", "eval.num_samples", take("evaluation.num_samples_for_fid"))
    steps = take("evaluation.steps_to_evaluate")
    if steps is not None:
        methods = [_method(step) for step in steps]
        out.set("evaluation.steps_to_evaluate", "eval.methods", [m for m in methods if m])
        for step, method in zip(steps, methods):
            if method is None:
                out.skip("evaluation.steps_to_evaluate", step, "a [steps, first_step] pair (a custom first step) is "
                         "not implemented")
