"""One function per pipeline stage: validated config in, URIs and numbers out.

The CLI, the KFP components and the Kubernetes Jobs all call these, so a stage behaves the same whichever
front door started it. Each stage records itself as an MLflow run — a child of ``parent_run_id`` when a
pipeline runs it — with the config, its metrics and its pictures.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import torch

from loomcfm_core import ablation, kfp_env, reflow, tracking
from loomcfm_core.ablation import ArmResult
from loomcfm_core.checkpoint import checkpoint_sha256
from loomcfm_core.config import Config
from loomcfm_core.data.cache import cache_dataset
from loomcfm_core.data.latents import cache_latents, image_dataset_of
from loomcfm_core.data.manifest import read_manifest
from loomcfm_core.errors import UsageError
from loomcfm_core.evaluation import evaluate as evaluate_checkpoint
from loomcfm_core.feature_store import classifier_uri, train_dataset_classifier
from loomcfm_core.kube import cluster_check
from loomcfm_core.kube.client import connect
from loomcfm_core.kube.launcher import run_rayjob
from loomcfm_core.kube.rayjob import RunIdentity, build_rayjob, cluster_config, load_template
from loomcfm_core.metrics import feature_network, feature_network_kind, reference_stats
from loomcfm_core.models.loading import check_buildable, default_device, fitting_weights, load_flow, load_model
from loomcfm_core.pipeline_summary import base_rows, record_summary, summary_table
from loomcfm_core.results import CacheResult, EvalResult, PairsResult, RunResult, SampleResult, TrainResult
from loomcfm_core.sampling import check_method, generate, sample_seeds, save_grid
from loomcfm_core.storage import is_remote, join, storage_for
from loomcfm_core.training.launch import rewind_run, run_on_ray
from loomcfm_core.training.loop import run_uri_for

LAUNCHERS = ("local", "rayjob")
EVALUATE_REFLOW = "evaluate_reflow"  # the label of the reflow model's evaluation, the last stage of a pipeline


@contextmanager
def stage_run(cfg: Config, stage: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """The stage's MLflow run, with the config recorded on it."""
    with tracking.start_run(cfg, stage, parent_run_id=parent_run_id, tags=tags) as run:
        tracking.log_config(cfg)
        yield run


def cache(cfg: Config, parent_run_id: str | None = None) -> CacheResult:
    """Cache ``cfg.data.source`` as HDF5 shards (a no-op when already cached), with what evaluation needs
    beside it: the digits classifier and the reference feature statistics of the train split. With
    ``model.autoencoder`` the train split is then encoded into a latent cache, which is what training reads."""
    with stage_run(cfg, "cache", parent_run_id):
        cached = cache_dataset(cfg)
        splits = cached.manifest["splits"]
        result = CacheResult(cached.uri, cached.created, splits["train"]["count"],
                             splits.get("val", {}).get("count", 0))
        if feature_network_kind(cfg) == "classifier":
            if not storage_for(cached.uri).exists(classifier_uri(cached.uri)):
                result.classifier_val_accuracy = train_dataset_classifier(cached.uri, cfg.data.local_cache,
                                                                          cfg.train.seed)
            reference_stats(cfg, cached.uri, feature_network(cfg, cached.uri))
        # Inception statistics of a large train split are left to the first evaluation, which has a GPU.
        if cfg.model.autoencoder is not None:
            latents = cache_latents(cfg, cached)
            result.dataset_uri, result.images_uri = latents.uri, cached.uri
            result.created = cached.created or latents.created
            result.latent_scale = latents.manifest["latent_space"]["scale"]
            tracking.log_latent_space(latents.manifest["latent_space"])
        mlflow.set_tag("loomcfm.dataset_uri", result.dataset_uri)
        numbers = {"num_train": result.num_train, "num_val": result.num_val,
                   "classifier_val_accuracy": result.classifier_val_accuracy}
        mlflow.log_metrics({k: float(v) for k, v in numbers.items() if v is not None})
    return result


def image_dataset_uri(cfg: Config, parent_run_id: str | None = None) -> str:
    """The cached image dataset of a config: ``data.uri``'s images (its own, or those a latent cache was
    encoded from) unless it holds reflow pairs, else the cache stage's."""
    if cfg.data.uri:
        manifest = read_manifest(cfg.data.uri)
        if manifest is not None and manifest.get("kind", "images") != "pairs":
            return image_dataset_of(cfg.data.uri)
    return image_dataset_of(cache(cfg, parent_run_id).dataset_uri)


def train(cfg: Config, dataset_uri: str | None = None, parent_run_id: str | None = None,
          wait: bool = False, resume_step: int | None = None) -> TrainResult:
    """Train on Ray Train (resuming a rerun) and register the EMA model under the alias ``base`` or ``reflow``
    (MLflow reserves ``latest``). The run's ``result.json`` (written by training) gets the registration
    beside it, so a launcher in another process reads the same result back.

    Args:
        wait: when another training holds the run folder's lease, wait for it instead of failing.
        resume_step: resume from this step's checkpoint, setting later ones aside (-1: the latest; the
            reference's ``--resume-step``).
    """
    check_buildable(cfg)  # before a dataset is cached for a network that cannot exist
    dataset_uri = dataset_uri or cfg.data.uri or cache(cfg, parent_run_id).dataset_uri
    summary = run_on_ray(cfg, dataset_uri, parent_run_id, wait=wait, resume_step=resume_step)
    model = load_model(cfg, summary.checkpoint_uri, torch.device("cpu"))
    alias = "reflow" if cfg.coupling.kind == "pairs" else "base"
    version = tracking.register_model(cfg, summary.mlflow_run_id, model, alias, summary.checkpoint_uri,
                                      checkpoint_sha256(summary.checkpoint_uri))
    result = TrainResult(**vars(summary), model_version=version, model_alias=alias)
    result.commit_registration()
    return result


def launch_train(cfg: Config, dataset_uri: str | None = None, parent_run_id: str | None = None,
                 launcher: str = "local", pairs_uri: str = "", init_from: str = "", kfp_run_id: str = "",
                 kfp_task: str = "", wait: bool = False, resume_step: int | None = None) -> TrainResult:
    """The train (or, given ``pairs_uri``, reflow-train) stage, in-process on Ray or as a KubeRay RayJob
    shaped and run by the config's ``kube`` section.

    This is what the KFP train component and ``loomcfm train`` call: the launcher is a parameter, not
    another pipeline. ``kfp_run_id`` and ``kfp_task`` name a pipeline step's RayJob (a retried step finds
    it again); without them the run folder does. ``wait``: a local training waits for another one holding
    the run folder's lease instead of failing (a RayJob's entrypoint always waits: its retry follows a failed
    attempt whose lease has to expire first). ``resume_step``: resume from that step's checkpoint, setting
    later ones aside (the reference's ``--resume-step``); for a RayJob this happens here, before it starts.
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
    if launcher == "local":
        return train(cfg, dataset_uri, parent_run_id, wait=wait, resume_step=resume_step)
    dataset_uri = dataset_uri or cfg.data.uri or cache(cfg, parent_run_id).dataset_uri
    trained = cluster_config(cfg)  # what the RayJob trains with: its run folder is this config's
    if resume_step is not None:
        rewind_run(trained, dataset_uri, resume_step, wait=wait)
    return train_on_kubernetes(cfg, dataset_uri, parent_run_id, RunIdentity(run_uri_for(trained, dataset_uri),
                                                                            kfp_run_id, kfp_task))


def train_on_kubernetes(cfg: Config, dataset_uri: str, parent_run_id: str | None = None,
                        identity: RunIdentity | None = None, api=None) -> TrainResult:
    """The train stage as a KubeRay RayJob (``loomcfm train`` on its head node); returns the same result.

    The config travels as resolved YAML text, so the RayJob trains exactly what this process validated;
    storage must be shared (``s3://``) for the result to be read back here.

    Args:
        identity: what names the RayJob; default: the run folder.
        api: a :class:`loomcfm_core.kube.client.KubeApi`; default: this pod's or the kubeconfig's cluster.
    """
    run_uri = run_uri_for(cluster_config(cfg), dataset_uri)  # the RayJob trains with the cluster's ray.*
    args = ["--dataset", dataset_uri] + (["--parent-run-id", parent_run_id] if parent_run_id else [])
    body = build_rayjob(load_template(), cfg, identity or RunIdentity(run_uri), args,
                        stage="reflow" if cfg.coupling.kind == "pairs" else "train", owner=kfp_env.step_pod())
    run_rayjob(api or connect(cfg.kube.namespace), body, cfg.kube)
    return TrainResult.read(run_uri)


def check_cluster(cfg: Config, launcher: str = "rayjob", inside: bool = False, probe: bool = True,
                  shm: str | None = None, step: bool = False) -> None:
    """``loomcfm cluster check`` (and a pipeline's first step, ``step``): prints the table of checks and raises
    :class:`~loomcfm_core.errors.ClusterCheckError` on any ✗ (:mod:`loomcfm_core.kube.cluster_check`)."""
    where = "inside the cluster" if inside else f"namespace {cfg.kube.namespace}, launcher {launcher}"
    cluster_check.report(cluster_check.run(cfg, launcher, inside, probe, shm, step), where, mark=inside)


def evaluate(cfg: Config, checkpoint_uri: str, dataset_uri: str | None = None, methods: list[str] | None = None,
             parent_run_id: str | None = None, label: str = "evaluate") -> EvalResult:
    """Distance to the data (FID, or fd_<dataset>) and NFE for each sampling method, with grids and a plot.

    Every method is checked and the checkpoint is loaded before anything else (no dataset is cached for a
    checkpoint that does not fit, no method samples before a later one is found misspelt).
    """
    methods = [check_method(method) for method in (methods or cfg.eval.methods)]
    fitting_weights(cfg, checkpoint_uri)
    dataset_uri = dataset_uri or image_dataset_uri(cfg, parent_run_id)
    with stage_run(cfg, label, parent_run_id, tags={"loomcfm.checkpoint_uri": checkpoint_uri}):
        with tempfile.TemporaryDirectory(prefix="loomcfm-eval-") as tmp:
            evaluation = evaluate_checkpoint(cfg, checkpoint_uri, dataset_uri, Path(tmp), methods)
            tracking.log_latent_space(evaluation.latent_space)
            for row in evaluation.rows:
                mlflow.log_metrics({f"{evaluation.metric}/{row.method}": row.distance, f"nfe/{row.method}": row.nfe,
                                    f"seconds/{row.method}": row.seconds})
            for path in evaluation.files:
                mlflow.log_artifact(str(path), "eval")
        mlflow.set_tag("loomcfm.eval_uri", evaluation.output_uri)
    tracking.describe_checkpoint(cfg, checkpoint_uri, f"{evaluation.metric} vs NFE of {checkpoint_uri}:\n\n"
                                 f"{evaluation.table()}")
    print(evaluation.table())
    if label == EVALUATE_REFLOW and parent_run_id:  # the last stage of both pipelines
        record_summary(cfg, parent_run_id, evaluation.metric, base_rows(cfg, parent_run_id), evaluation.rows)
    return EvalResult(evaluation.metric, evaluation.output_uri, checkpoint_uri, evaluation.rows, evaluation.table())


def pairs(cfg: Config, checkpoint_uri: str, parent_run_id: str | None = None,
          output: str | None = None) -> PairsResult:
    """Generate reflow (noise seed, sample) pairs from a checkpoint with ``reflow.method``, into ``output``
    (default: the content-addressed URI under the storage root)."""
    with stage_run(cfg, "pairs", parent_run_id, tags={"loomcfm.checkpoint_uri": checkpoint_uri}):
        uri, manifest = reflow.generate_pairs(cfg, checkpoint_uri, output=output)
        tracking.log_latent_space(manifest.get("latent_space"))
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
    samples = generate(flow.model, cfg.flow_shape, method, sample_seeds(num_images, offset=cfg.train.seed << 32),
                       batch_size, device)
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
        for row in scored.rows:
            mlflow.log_metrics({f"{scored.metric}/{row.method}": row.distance, f"nfe/{row.method}": row.nfe})
    return ArmResult(arm, scored.metric, trained.checkpoint_uri, scored.rows)


def ablation_report(cfg: Config, parent_run_id: str, arms: list[ArmResult], workdir: Path) -> dict[str, Path]:
    """The comparison of the arms (plot, Markdown and HTML table) into ``workdir`` and onto the parent run."""
    files = ablation.record_comparison(cfg, parent_run_id, arms, workdir)
    print(files["ablation.md"].read_text())
    return files


def start_pipeline_run(cfg: Config) -> str:
    """Open and close the parent MLflow run of a pipeline whose stages run elsewhere (KFP steps), tagged with
    the KFP run id the later steps find it by (:func:`loomcfm_core.kfp_env.pipeline_parent`); first, fail
    when the config keeps data or runs on a KFP pod's own disk (:func:`loomcfm_core.kfp_env.check_shared`)."""
    kfp_env.check_shared(cfg)
    tags = {tracking.KFP_RUN_TAG: run_id} if (run_id := kfp_env.kfp_run_id()) else None
    with tracking.start_run(cfg, tracking.PIPELINE_STAGE, tags=tags) as parent:
        tracking.log_config(cfg)
    return parent.info.run_id


def run(cfg: Config, tags: dict[str, str] | None = None) -> RunResult:
    """The whole pipeline under one parent MLflow run: cache → train → evaluate → pairs → reflow → evaluate;
    the reflow evaluation records the summary on the parent run (:mod:`loomcfm_core.pipeline_summary`)."""
    with tracking.start_run(cfg, tracking.PIPELINE_STAGE, tags=tags) as parent:
        tracking.log_config(cfg)
        parent_id = parent.info.run_id
        cached = cache(cfg, parent_id)
        base = train(cfg, cached.dataset_uri, parent_id)
        base_eval = evaluate(cfg, base.checkpoint_uri, cached.dataset_uri, parent_run_id=parent_id)
        generated = pairs(cfg, base.checkpoint_uri, parent_id)
        reflowed = launch_train(cfg, cached.dataset_uri, parent_id, pairs_uri=generated.pairs_uri,
                                init_from=base.checkpoint_uri)
        reflow_eval = evaluate(cfg, reflowed.checkpoint_uri, cached.dataset_uri, parent_run_id=parent_id,
                               label=EVALUATE_REFLOW)
    summary = summary_table(base_eval.metric, base_eval.rows, reflow_eval.rows)
    return RunResult(parent_id, tracking.tracking_uri(cfg), cached.dataset_uri, base, base_eval, generated, reflowed,
                     reflow_eval, summary)
