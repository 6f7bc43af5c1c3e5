"""MLflow runs for every pipeline stage: where they are stored, which experiment, and the config they record.

The same stage code runs on a laptop and on a cluster, so the store comes from the ``tracking`` section alone:
with no ``tracking.uri`` it is a SQLite file under ``tracking.local_dir`` (nothing to start, nothing shared), on
the cluster it is the MLflow server, which proxies artifacts to S3 so stages need no S3 credentials of their
own. The experiment is the config's (``Config.experiment``); the registered model is :mod:`loomcfm_core.serving`'s.

Stages run in separate processes (Ray workers, KFP pods) where MLflow's in-process stack of nested runs does
not exist, so a child run names its parent explicitly (``parent_run_id``) instead of relying on nesting.
Metrics and artifacts are logged with plain ``mlflow.log_metrics`` / ``mlflow.log_artifact`` /
``mlflow.log_image`` inside :func:`start_run`; wrapping those would add nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import requests
from mlflow.entities import LifecycleStage
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from loomcfm_core.config import Config, TrackingConfig
from loomcfm_core.errors import TrackingError, TrackingUnavailable
from loomcfm_core.mlflow_stack import leave
from loomcfm_core.models.autoencoder import LatentSpace
from loomcfm_core.processes import stopped_by
from loomcfm_core.run_status import FAILED, KILLED, alive, end_as, holder_tags, reap_dead_runs

STAGE_TAG = "loomcfm.stage"
KFP_RUN_TAG = "kfp.run_id"  # on a pipeline's parent run: the KFP run it belongs to
PIPELINE_STAGE = "pipeline"
CONFIG_ARTIFACT = "config.yaml"
log = logging.getLogger(__name__)
SERVER_SCHEMES = ("http", "https")


def _local_dir(settings: TrackingConfig) -> Path:
    return Path(settings.local_dir).expanduser().resolve()


def tracking_uri(settings: TrackingConfig) -> str:
    """``tracking.uri``, or a SQLite store under ``tracking.local_dir`` so a laptop run needs no server.

    The path is made absolute so every process of one run (whatever its cwd) writes to the same file.
    """
    if settings.uri:
        return settings.uri
    local_dir = _local_dir(settings)
    local_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{local_dir / 'mlflow.db'}"


def is_server(uri: str) -> bool:
    """Whether the store is a tracking server, which decides where artifacts go (and proxies them)."""
    return urlparse(uri).scheme in SERVER_SCHEMES


def ui_command(uri: str) -> str:
    """How a person browses the store: ``mlflow ui`` on a local one, the server's address otherwise."""
    return f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {uri}"


def artifact_location(settings: TrackingConfig) -> str | None:
    """Where a new experiment keeps its artifacts: the server's choice, else ``<local_dir>/artifacts``.

    Without an explicit location a local store puts artifacts in ``./mlruns`` of whatever directory the
    process happens to run in, scattering them away from the database that refers to them.
    """
    if is_server(tracking_uri(settings)):
        return None
    return (_local_dir(settings) / "artifacts").as_uri()


def _is_connection_failure(exc: BaseException | None) -> bool:
    """MLflow reports a refused/timed-out request as a bare MlflowException; the cause is in the chain."""
    while exc is not None:
        if isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def _name_unreachable_server(uri: str) -> Iterator[None]:
    """Turn "API request to .../experiments/get-by-name failed with exception HTTPConnectionPool..." into
    an error that says which tracking server is down, before any stage work starts."""
    try:
        yield
    except MlflowException as exc:
        if _is_connection_failure(exc):
            raise TrackingUnavailable(f"cannot reach the MLflow tracking server at {uri}; is it running and is "
                                f"tracking.uri right? ({exc.message})") from exc
        if exc.error_code == "UNAUTHENTICATED":
            raise TrackingError(f"the MLflow tracking server at {uri} refused the credentials: set "
                                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (on a cluster: the "
                                "Secret loomcfm-mlflow)") from exc
        raise


def experiment_id(settings: TrackingConfig, name: str) -> str:
    """Get or create the experiment ``name`` (a config's ``Config.experiment``) and return its id.

    Creation tolerates losing a race to another worker creating the same experiment at the same time.
    """
    uri = tracking_uri(settings)
    client = MlflowClient(uri)
    with _name_unreachable_server(uri):
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return client.create_experiment(name, artifact_location=artifact_location(settings))
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == LifecycleStage.DELETED:
        raise TrackingError(f"experiment {name!r} at {uri} is deleted; restore it (mlflow experiments restore "
                            f"--experiment-id {experiment.experiment_id}) or set tracking.experiment")
    return experiment.experiment_id


def _run_exists(uri: str, run_id: str) -> bool:
    try:
        MlflowClient(uri).get_run(run_id)
        return True
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        log.warning("MLflow run %s is not in %s; starting a new run", run_id, uri)
        return False


@contextmanager
def start_run(settings: TrackingConfig, experiment: str, run_name: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None, run_id: str | None = None,
              attach: bool = False) -> Iterator[mlflow.ActiveRun]:
    """Make ``run_name`` the active MLflow run in the store of ``settings`` (the ``tracking`` section) and the
    experiment ``experiment`` (``Config.experiment``) for the ``with`` body.

    ``parent_run_id`` makes it a child run even in another process (a Ray worker, a KFP pod); pass the id
    explicitly rather than through ``MLFLOW_RUN_ID``, which would make MLflow resume that run instead.
    Inside another active run of this process the parent is implied (``parent_run_id``, if given, must be
    that run). The run is tagged ``loomcfm.stage=<run_name>`` (``tags`` may override) so stages can be found
    across pipeline runs. ``run_id`` reopens an existing run instead (a resumed training keeps logging into
    the run it started).

    The process that opens a run holds it (:mod:`loomcfm_core.run_status`): it first marks FAILED the runs
    that dead processes left RUNNING, keeps a heartbeat on its own, and ends it KILLED on SIGINT/SIGTERM
    (``KeyboardInterrupt``) or FAILED on an error, giving a parent that status too. ``attach`` only logs into
    a run another process holds (Ray workers, into the run their driver opened).
    """
    uri = tracking_uri(settings)
    mlflow.set_tracking_uri(uri)
    exp_id = experiment_id(settings, experiment)
    client = MlflowClient(uri)
    if not attach:
        reap_dead_runs(client, exp_id)
    if run_id and _run_exists(uri, run_id):
        opened = mlflow.start_run(run_id=run_id, nested=True)
    else:
        # nested=True: without it MLflow refuses a second run in a process even when parent_run_id names the
        # active one; with no active run it changes nothing.
        opened = mlflow.start_run(experiment_id=exp_id, run_name=run_name, nested=True, parent_run_id=parent_run_id,
                                  tags={STAGE_TAG: run_name, **(tags or {}), **({} if attach else holder_tags())})
    with opened as run:
        if attach:
            try:
                yield run
            finally:
                leave(run)
            return
        parent = parent_run_id or run.data.tags.get("mlflow.parentRunId")
        try:
            with alive(client, run.info.run_id):
                yield run
        except BaseException as exc:
            killed = isinstance(exc, KeyboardInterrupt)
            status = KILLED if killed else FAILED
            mlflow.end_run(status)
            reason = f"stopped by {stopped_by()}" if killed else f"{type(exc).__name__}: {str(exc)[:200]}"
            try:
                end_as(client, run.info.run_id, status, parent, reason)
            except Exception as tracking_exc:  # noqa: BLE001 - the store may be what failed: keep exc
                log.warning("could not record why run %s ended: %s", run.info.run_id, tracking_exc)
            raise


def find_pipeline_run(settings: TrackingConfig, experiment: str, kfp_run_id: str) -> str | None:
    """The parent run a pipeline's first step opened for the KFP run ``kfp_run_id``, or None.

    Steps find their parent this way at run time instead of taking its id as an input, because every input
    is part of KFP's cache key and a per-run id would keep deterministic steps from ever being reused.
    """
    uri = tracking_uri(settings)
    query = f"tags.`{KFP_RUN_TAG}` = '{kfp_run_id}' and tags.`{STAGE_TAG}` = '{PIPELINE_STAGE}'"
    with _name_unreachable_server(uri):
        runs = MlflowClient(uri).search_runs([experiment_id(settings, experiment)], query, max_results=1,
                                             order_by=["attributes.start_time DESC"])
    if not runs:
        log.warning("no MLflow parent run for KFP run %s in %s; this step's run has no parent", kfp_run_id, uri)
        return None
    return runs[0].info.run_id


def load_text(settings: TrackingConfig, run_id: str, artifact_path: str) -> str:
    """A text artifact of a run (a table a pipeline recorded on its parent run)."""
    mlflow.set_tracking_uri(tracking_uri(settings))
    return mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact_path}")


def config_params(cfg: Config) -> dict[str, str]:
    """The flattened config as MLflow param strings: strings as they are, everything else as JSON.

    JSON (``[1, 2]``, ``null``, ``true``) rather than Python's ``str`` so a value can be pasted back into
    ``--set key=value`` or parsed by a program comparing runs.
    """
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in cfg.flat().items()}


def log_config(cfg: Config) -> None:
    """Record the config on the active run: as params to filter and compare runs by, and as ``config.yaml``
    to rerun or load it exactly (``load_config_text``).

    MLflow's client already splits params into batches of 100 and truncates values over 6000 characters
    (with a warning), so neither needs handling here.
    """
    if mlflow.active_run() is None:
        # mlflow.log_params would silently start a run in the default experiment and store.
        raise TrackingError("log_config needs an active run; call it inside `with start_run(...)`")
    mlflow.log_params(config_params(cfg))
    mlflow.log_text(cfg.to_yaml(), CONFIG_ARTIFACT)


def log_latent_space(space: dict | None) -> None:
    """Record a latent run's autoencoder (kind, format, path, sha256, ...) and the scale in effect on the
    active run, as ``autoencoder.*`` params and ``autoencoder.json``; nothing for a pixel-space run.

    The scale is its own param: the config's ``model.autoencoder.scale`` is often null (computed at cache
    time), and MLflow never lets a param change once logged.
    """
    if space is None:
        return
    mlflow.log_params(LatentSpace.from_dict(space).params())
    mlflow.log_dict(space, "autoencoder.json")
