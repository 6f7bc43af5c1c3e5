"""One function per pipeline stage: validated config in, URIs and numbers out.

The CLI, the KFP components and the Kubernetes Jobs all call these, so a stage behaves the same whichever
front door started it. Each stage records itself as an MLflow run — a child of ``parent_run_id`` when a
pipeline runs it — with the config, its metrics and its pictures. What a stage needs from another is an
explicit call here (the cache a training without a dataset asks for, the summary the reflow evaluation
writes), never a side effect further down.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import torch

from loomcfm_core import ablation, kfp_env, provenance, reflow, run_record, serving, tracking
from loomcfm_core.ablation import ArmResult
from loomcfm_core.checkpoint import checkpoint_sha256
from loomcfm_core.choices import LAUNCHERS, check_method
from loomcfm_core.config import Config
from loomcfm_core.data.cache import cache_dataset
from loomcfm_core.data.latents import cache_latents, image_dataset_of
from loomcfm_core.data.manifest import read_manifest
from loomcfm_core.errors import TrackingError, UsageError
from loomcfm_core.evaluation.scoring import evaluate as score_checkpoint
from loomcfm_core.evaluation.samples import check_feature_weights
from loomcfm_core.evaluation.scoring import prepare_reference
from loomcfm_core.evaluation.summary import base_rows, curve_points, record_summary, summary_table
from loomcfm_core.kube import cluster_check
from loomcfm_core.kube.client import connect
from loomcfm_core.kube.launcher import run_rayjob
from loomcfm_core.kube.rayjob import RunIdentity, build_rayjob, cluster_config, load_template
from loomcfm_core.layout import holders_uri, run_uri
from loomcfm_core.models.loading import check_buildable, default_device, fitting_weights, load_flow, load_model
from loomcfm_core.results import CacheResult, EvalResult, MethodResult, PairsResult, RunResult, SampleResult
from loomcfm_core.sampling import generate, sample_seeds, save_grid
from loomcfm_core.storage import absolute, is_remote, join, storage_for
from loomcfm_core.training.driver import rewind_run, run_on_ray
from loomcfm_core.training.result import TrainResult, read_result, write_registration

log = logging.getLogger(__name__)


@contextmanager
def stage_run(cfg: Config, stage: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
              system_metrics: bool = False) -> Iterator[mlflow.ActiveRun]:
    """The stage's MLflow run (``<config> <stage> <date>``, tagged with where it came from), with the settings
    that define the stage recorded on it (:mod:`loomcfm_core.run_record`); ``system_metrics``: sampled every
    ``tracking.system_metrics_seconds``."""
    tags = {**run_record.stage_tags(cfg, stage), **(tags or {})}
    seconds = cfg.tracking.system_metrics_seconds if system_metrics else 0.0
    with tracking.start_run(cfg.tracking, cfg.experiment, provenance.run_name(cfg.name, stage), parent_run_id,
                            tags, holders=holders_uri(cfg), metrics_seconds=seconds) as run:
        run_record.log_config(cfg, tags[tracking.STAGE_TAG])
        yield run


def cache(cfg: Config, parent_run_id: str | None = None, *, latents: bool = True) -> CacheResult:
    """Cache ``cfg.data.source`` as HDF5 shards (a no-op when already cached), with what evaluation needs
    beside it: the digits classifier and the reference feature statistics of the train split. With
    ``model.autoencoder`` the train split is then encoded into a latent cache, which is what training reads.

    Args:
        latents: encode the latent cache too (evaluation compares with images only, and a reference
            checkpoint brings its own autoencoder, so it asks for the images alone).
    """
    with stage_run(cfg, "cache", parent_run_id):
        cached = cache_dataset(cfg)
        splits = cached.manifest["splits"]
        result = CacheResult(cached.uri, cached.created, splits["train"]["count"],
                             splits.get("val", {}).get("count", 0))
        result.classifier_val_accuracy = prepare_reference(cfg, cached.uri)
        if cfg.is_latent and latents:
            encoded = cache_latents(cfg, cached)
            result.dataset_uri, result.images_uri = encoded.uri, cached.uri
            result.created = cached.created or encoded.created
            result.latent_scale = encoded.manifest["latent_space"]["scale"]
            run_record.log_latent_space(encoded.manifest["latent_space"])
        mlflow.set_tag("loomcfm.dataset_uri", result.dataset_uri)
        numbers = {"num_train": result.num_train, "num_val": result.num_val,
                   "classifier_val_accuracy": result.classifier_val_accuracy}
        mlflow.log_metrics({k: float(v) for k, v in numbers.items() if v is not None})
    return result


def dataset_to_train_on(cfg: Config, parent_run_id: str | None = None) -> str:
    """The dataset a training reads when it is given none: ``data.uri``, else this config's cache, which the
    cache stage builds now if it is not there (a no-op when it is)."""
    if cfg.data.uri:
        return cfg.data.uri
    log.info("no dataset given and no data.uri: caching %s first (the cache stage)", cfg.data.source)
    return cache(cfg, parent_run_id).dataset_uri


def image_dataset_uri(cfg: Config, parent_run_id: str | None = None) -> str:
    """The cached image dataset an evaluation compares with: ``data.uri``'s images (its own, or those a latent
    cache was encoded from) unless it holds reflow pairs, else this config's cache (built now if missing)."""
    if cfg.data.uri:
        manifest = read_manifest(cfg.data.uri)
        if manifest is not None and manifest.get("kind", "images") != "pairs":
            return image_dataset_of(cfg.data.uri)
    log.info("no image dataset given: caching %s first (the cache stage) to compare with", cfg.data.source)
    return cache(cfg, parent_run_id, latents=False).dataset_uri


def train(cfg: Config, dataset_uri: str | None = None, parent_run_id: str | None = None, *, launcher: str = "local",
          pairs_uri: str = "", init_from: str = "", kfp_run_id: str = "", kfp_task: str = "", wait: bool = False,
          resume_step: int | None = None) -> TrainResult:
    """Train (resuming a rerun) and register the EMA model under the alias ``base``, or ``reflow`` given
    ``pairs_uri``: the reflow training of the pairs ``init_from`` generated (MLflow reserves ``latest``).

    Args:
        dataset_uri: what to train on; default: :func:`dataset_to_train_on`.
        launcher: ``local``: the driver is this process, on Ray here (:func:`~loomcfm_core.training.driver.
            run_on_ray`); ``rayjob``: a KubeRay RayJob shaped by the ``kube`` section, whose head runs
            ``loomcfm train`` (:func:`train_on_kubernetes`). The KFP train component and ``loomcfm train``
            both call this: the launcher is a parameter, not another pipeline.
        kfp_run_id, kfp_task: name a pipeline step's RayJob (a retried step finds it again); without them the
            run folder does.
        wait: a local training waits for another one holding the run folder's lease instead of failing (a
            RayJob's entrypoint always waits: its retry follows a failed attempt whose lease has to expire).
        resume_step: resume from that step's checkpoint, setting later ones aside (the reference's
            ``--resume-step``); for a RayJob this happens here, before it starts.
    """
    if launcher not in LAUNCHERS:
        raise UsageError(f"launcher must be one of {', '.join(map(repr, LAUNCHERS))}, got {launcher!r}")
    if launcher == "rayjob" and not is_remote(cfg.storage.root):
        raise UsageError(f"launcher=rayjob needs storage.root on shared storage (s3://...), got "
                         f"{cfg.storage.root!r}: the cluster's checkpoints would be unreachable from here")
    if pairs_uri and not init_from:
        raise UsageError("reflow training from pairs_uri needs init_from (the checkpoint that generated them)")
    if pairs_uri:
        cfg, dataset_uri = reflow.reflow_config(cfg, pairs_uri, init_from), pairs_uri
    check_buildable(cfg)  # before a dataset is cached for a network that cannot exist
    dataset_uri = dataset_uri or dataset_to_train_on(cfg, parent_run_id)
    if launcher == "rayjob":
        trained = cluster_config(cfg)  # what the RayJob trains with: its run folder is this config's
        if resume_step is not None:
            rewind_run(trained, dataset_uri, resume_step, wait=wait)
        identity = RunIdentity(run_uri(trained, dataset_uri), kfp_run_id, kfp_task)
        return train_on_kubernetes(cfg, dataset_uri, parent_run_id, identity)
    result = run_on_ray(cfg, dataset_uri, parent_run_id, wait=wait, resume_step=resume_step)
    result.model_alias = "reflow" if cfg.is_reflow else "base"
    model = load_model(cfg, result.checkpoint_uri, torch.device("cpu"))
    uri = tracking.tracking_uri(cfg.tracking)
    try:  # the registry is MLflow's: a server that went away during the training is said now, in one line
        tracking.check_reachable(uri, again=True)
        with tracking.named_failures(uri):
            sha256 = checkpoint_sha256(result.checkpoint_uri)
            result.model_version = serving.register_model(cfg, result.mlflow_run_id, model, result.model_alias,
                                                          result.checkpoint_uri, sha256)
    except TrackingError as exc:
        raise type(exc)(f"{exc}; the training finished ({result.checkpoint_uri}), only its registration is "
                        "missing: run the same command again to register it") from None
    scores = {k: v for k, v in result.metrics.items() if k.startswith("during_training/")}
    if scores:  # the last evaluation during training, on the version: registry lists can be sorted by it
        serving.describe_checkpoint(cfg.tracking, cfg.registered_model, result.checkpoint_uri, None, scores)
    write_registration(result)  # beside result.json: a launcher in another process reads both
    return result


def train_on_kubernetes(cfg: Config, dataset_uri: str, parent_run_id: str | None = None,
                        identity: RunIdentity | None = None, api=None) -> TrainResult:
    """The train stage as a KubeRay RayJob (``loomcfm train`` on its head node); returns the same result.

    The config travels as resolved YAML text, so the RayJob trains exactly what this process validated;
    storage must be shared (``s3://``) for the result to be read back here.

    Args:
        identity: what names the RayJob; default: the run folder.
        api: a :class:`loomcfm_core.kube.client.KubeApi`; default: this pod's or the kubeconfig's cluster.
    """
    run = run_uri(cluster_config(cfg), dataset_uri)  # the RayJob trains with the cluster's ray.*
    args = ["--dataset", dataset_uri] + (["--parent-run-id", parent_run_id] if parent_run_id else [])
    body = build_rayjob(load_template(), cfg, identity or RunIdentity(run), args,
                        stage="reflow" if cfg.is_reflow else "train", owner=kfp_env.step_pod())
    run_rayjob(api or connect(cfg.kube.namespace), body, cfg.kube)
    return read_result(run, registered=True)


def check_cluster(cfg: Config, launcher: str = "rayjob", inside: bool = False, probe: bool = True,
                  shm: str | None = None, step: bool = False) -> None:
    """``loomcfm cluster check`` (and a pipeline's first step, ``step``): prints the table of checks and raises
    :class:`~loomcfm_core.errors.ClusterCheckError` on any ✗ (:mod:`loomcfm_core.kube.cluster_check`)."""
    where = "inside the cluster" if inside else f"namespace {cfg.kube.namespace}, launcher {launcher}"
    cluster_check.report(cluster_check.run(cfg, launcher, inside, probe, shm, step), where, mark=inside)


def evaluate(cfg: Config, checkpoint_uri: str, dataset_uri: str | None = None, methods: list[str] | None = None,
             parent_run_id: str | None = None) -> EvalResult:
    """Distance to the data (FID, or fd_<dataset>) and NFE for each sampling method, with grids and a plot.

    Every method is checked and the checkpoint is loaded before anything else (no dataset is cached for a
    checkpoint that does not fit, no method samples before a later one is found misspelt).
    """
    return _evaluate(cfg, checkpoint_uri, dataset_uri, methods, parent_run_id, "evaluate")


def evaluate_reflow(cfg: Config, checkpoint_uri: str, parent_run_id: str, dataset_uri: str | None = None,
                    methods: list[str] | None = None, base: list[MethodResult] | None = None) -> EvalResult:
    """The last stage of both pipelines: evaluate the reflowed model like :func:`evaluate` (as the run
    ``evaluate_reflow``), then record the pipeline's summary, base vs reflow, on the parent run
    (:mod:`loomcfm_core.evaluation.summary`).

    Args:
        parent_run_id: the pipeline's parent MLflow run, which the summary goes to.
        base: the base model's rows when this process has them (``loomcfm run``); default: those of the base
            evaluation among the parent's children (a KFP step; none in the reflow pipeline).
    """
    if not parent_run_id:
        raise UsageError("evaluate_reflow records the pipeline's summary on its parent MLflow run, and has none")
    result = _evaluate(cfg, checkpoint_uri, dataset_uri, methods, parent_run_id, "evaluate_reflow")
    base = base if base is not None else base_rows(cfg.tracking, cfg.experiment, parent_run_id)
    record_summary(cfg.tracking, parent_run_id, result.metric, base, result.rows)
    return result


def _evaluate(cfg: Config, checkpoint_uri: str, dataset_uri: str | None, methods: list[str] | None,
              parent_run_id: str | None, run_name: str) -> EvalResult:
    # each method once, in the order given: a repeated one would be sampled and scored again for the same row
    methods = list(dict.fromkeys(check_method(method) for method in (methods or cfg.eval.methods)))
    fitting_weights(cfg, checkpoint_uri)
    check_feature_weights(cfg)
    dataset_uri = dataset_uri or image_dataset_uri(cfg, parent_run_id)
    versions = serving.checkpoint_versions(cfg.tracking, cfg.registered_model, checkpoint_uri)
    cfg = cfg.model_copy(deep=True)
    cfg.eval.methods = methods  # what the run's params say it scored (``--methods`` may differ from the config)
    with stage_run(cfg, run_name, parent_run_id, tags={"loomcfm.checkpoint_uri": checkpoint_uri},
                   system_metrics=True) as run:
        run_record.log_evaluated(cfg, checkpoint_uri, image_dataset_of(dataset_uri),
                                 versions[-1] if versions else None)
        with tempfile.TemporaryDirectory(prefix="loomcfm-eval-") as tmp:
            scored = score_checkpoint(cfg, checkpoint_uri, dataset_uri, Path(tmp), methods)
            result = EvalResult(scored.metric, scored.output_uri, checkpoint_uri, scored.rows, scored.table())
            run_record.log_latent_space(scored.latent_space)
            mlflow.MlflowClient().log_batch(run.info.run_id, metrics=curve_points(result.metric, result.rows))
            for path in scored.files:
                mlflow.log_artifact(str(path), "eval")
        text = f"**{result.metric} vs NFE** of `{checkpoint_uri}` (lower is better)\n\n{result.table}"
        mlflow.set_tags({"loomcfm.eval_uri": result.eval_uri, tracking.NOTE_TAG: text})
    scores = {f"{result.metric}/{row.method}": row.distance for row in result.rows}
    serving.describe_checkpoint(cfg.tracking, cfg.registered_model, checkpoint_uri, text, scores, cfg.eval.num_samples)
    best = cfg.eval.during_training.method
    if versions and best in methods:
        serving.move_best_alias(cfg.tracking, cfg.registered_model, f"{result.metric}/{best}", best)
    heading = "the reflowed model" if run_name == "evaluate_reflow" else "the model"
    print(f"\n{result.metric} vs NFE of {heading} {checkpoint_uri}\n(sample grids, the plot and results.json: "
          f"{result.eval_uri})\n{result.table}")
    return result


def pairs(cfg: Config, checkpoint_uri: str, parent_run_id: str | None = None,
          output: str | None = None) -> PairsResult:
    """Generate reflow (noise seed, sample) pairs from a checkpoint with ``reflow.method``, into ``output``
    (default: the content-addressed URI under the storage root)."""
    with stage_run(cfg, "pairs", parent_run_id, tags={"loomcfm.checkpoint_uri": checkpoint_uri},
                   system_metrics=True):
        mlflow.log_param("checkpoint_uri", absolute(checkpoint_uri))
        uri, manifest = reflow.generate_pairs(cfg, checkpoint_uri, output=output)
        run_record.log_latent_space(manifest.get("latent_space"))
        count = manifest["splits"]["train"]["count"]
        mlflow.set_tag("loomcfm.pairs_uri", uri)
        mlflow.log_metric("num_pairs", count)
    return PairsResult(uri, count, cfg.reflow.method)


def sample(cfg: Config, checkpoint_uri: str, output: str, num_images: int, method: str, batch_size: int,
           nrows: int) -> SampleResult:
    """PNG files and a grid from a checkpoint's EMA model (the reference's ``sample.py``); a latent model's
    samples are decoded to images."""
    from PIL import Image

    device = default_device()
    flow = load_flow(cfg, checkpoint_uri, device)
    seeds = sample_seeds(num_images, offset=serving.sample_seed_offset(cfg))
    samples = generate(flow.model, cfg.flow_shape, method, seeds, batch_size, device)
    images = flow.images(samples.images, device)
    store = storage_for(output)
    with tempfile.TemporaryDirectory() as tmp:
        for i, image in enumerate(images.numpy()):
            path = Path(tmp) / f"{i:05d}.png"
            Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(path)
            store.put(path, join(output, path.name))
        grid = Path(tmp) / "grid.png"
        save_grid(images, grid, nrow=nrows)
        store.put(grid, join(output, "grid.png"))
    return SampleResult(output, num_images, method, samples.nfe, join(output, "grid.png"))


def ablation_arm(cfg: Config, arm: str, dataset_uri: str, parent_run_id: str | None = None) -> ArmResult:
    """One arm of the coupling ablation (:mod:`loomcfm_core.ablation`): train the config with the arm's
    coupling and evaluate it at ``eval.methods``, under a child run ``ablation_<arm>`` of the parent."""
    arm_cfg = ablation.arm_config(cfg, arm)
    with stage_run(arm_cfg, f"ablation_{arm}", parent_run_id, tags={tracking.STAGE_TAG: "ablation",
                                                                   "loomcfm.ablation_arm": arm}) as run:
        trained = train(arm_cfg, dataset_uri, run.info.run_id)
        scored = evaluate(arm_cfg, trained.checkpoint_uri, dataset_uri, parent_run_id=run.info.run_id)
        mlflow.log_metrics(scored.metrics())
    return ArmResult(arm, scored.metric, trained.checkpoint_uri, scored.rows)


def ablation_report(cfg: Config, parent_run_id: str, arms: list[ArmResult], workdir: Path) -> dict[str, Path]:
    """The comparison of the arms (plot, Markdown and HTML table) into ``workdir`` and onto the parent run."""
    files = ablation.record_comparison(cfg.tracking, parent_run_id, arms, workdir)
    print(files["ablation.md"].read_text())
    return files


def start_pipeline_run(cfg: Config) -> str:
    """Open and close the parent MLflow run of a pipeline whose stages run elsewhere (KFP steps), tagged with
    the KFP run id the later steps find it by (:func:`loomcfm_core.kfp_env.pipeline_parent`); first, fail
    when the config keeps data or runs on a KFP pod's own disk (:func:`loomcfm_core.kfp_env.check_shared`)."""
    kfp_env.check_shared(cfg)
    tags = {tracking.KFP_RUN_TAG: run_id} if (run_id := kfp_env.kfp_run_id()) else None
    with stage_run(cfg, tracking.PIPELINE_STAGE, tags=tags) as parent:
        pass
    return parent.info.run_id


def run(cfg: Config, tags: dict[str, str] | None = None) -> RunResult:
    """The whole pipeline under one parent MLflow run: cache → train → evaluate → pairs → reflow train →
    evaluate and record the summary (:func:`evaluate_reflow`)."""
    check_feature_weights(cfg)  # before hours of training, not after
    with stage_run(cfg, tracking.PIPELINE_STAGE, tags=tags) as parent:
        parent_id = parent.info.run_id
        cached = cache(cfg, parent_id)
        base = train(cfg, cached.dataset_uri, parent_id)
        base_eval = evaluate(cfg, base.checkpoint_uri, cached.dataset_uri, parent_run_id=parent_id)
        generated = pairs(cfg, base.checkpoint_uri, parent_id)
        reflowed = train(cfg, parent_run_id=parent_id, pairs_uri=generated.pairs_uri, init_from=base.checkpoint_uri)
        reflow_eval = evaluate_reflow(cfg, reflowed.checkpoint_uri, parent_id, cached.dataset_uri,
                                      base=base_eval.rows)
    summary = summary_table(base_eval.metric, base_eval.rows, reflow_eval.rows)
    return RunResult(parent_id, tracking.tracking_uri(cfg.tracking), cached.dataset_uri, base, base_eval, generated,
                     reflowed, reflow_eval, summary)
