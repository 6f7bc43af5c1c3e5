"""MLflow runs for every pipeline stage: where they are stored, which experiment, and what they record.

The same stage code runs on a laptop and on a cluster, so the store comes from the ``tracking`` section alone:
with no ``tracking.uri`` it is a SQLite file under ``tracking.local_dir`` (nothing to start, nothing shared), on
the cluster it is the MLflow server, which proxies artifacts to S3 so stages need no S3 credentials of their
own. The experiment is the config's (``Config.experiment``); the registered model is :mod:`loomcfm_core.serving`'s.

Stages run in separate processes (Ray workers, KFP pods) where MLflow's in-process stack of nested runs does
not exist, so a child run names its parent explicitly (``parent_run_id``) instead of relying on nesting.

MLflow records a training; it is not what a training depends on (checkpoints and the run folder's lease are):
a server that is down before work is one line within seconds (:func:`check_reachable`), and one that goes
away later costs tracking data, never the stage's result (:func:`quick_calls` bounds what ending a run may
wait; a training buffers its metrics, :mod:`loomcfm_core.metric_sink`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlparse

import mlflow
import requests
from mlflow.entities import LifecycleStage
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from loomcfm_core.chart_view import own_views
from loomcfm_core.choices import TRACKING_SERVER_SCHEMES
from loomcfm_core.config import TrackingConfig
from loomcfm_core.errors import TrackingError, TrackingUnavailable
from loomcfm_core.mlflow_stack import leave
from loomcfm_core.processes import stopped_by
from loomcfm_core.run_status import FAILED, KILLED, end_as, held, reap_dead_runs
from loomcfm_core.system_metrics import system_metrics

STAGE_TAG = "loomcfm.stage"
KFP_RUN_TAG = "kfp.run_id"  # on a pipeline's parent run: the KFP run it belongs to
PIPELINE_STAGE = "pipeline"
NOTE_TAG = "mlflow.note.content"  # a run's or experiment's description (Markdown) in MLflow's UI
# MLflow 3.17's UI picks its GenAI or model-training view by a per-browser switch (the workflowType URL
# parameter wins); older 3.x UIs read this experiment tag instead. Both are set.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
VIEW_QUERY = "workflowType=machine_learning"
UI_ADDRESS = "http://127.0.0.1:5000"
PROBE_SECONDS = (3.0, 5.0)  # connect, read: a server that is there answers /health at once
log = logging.getLogger(__name__)
_reachable: set[str] = set()


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
    return urlparse(uri).scheme in TRACKING_SERVER_SCHEMES


def browse_lines(uri: str, experiment_id: str, views: dict[str, str] | None = None) -> list[str]:
    """How a person opens the experiment's runs in MLflow's model-training view: for a local store, the
    ``mlflow ui`` of this environment by its absolute path (it works from any folder, activated or not) and
    the page to open; for a server, the page; then each saved view of ``views`` (id → name, the charts
    :mod:`loomcfm_core.chart_view` overlays) by its link."""
    page = f"/#/experiments/{experiment_id}/runs?{VIEW_QUERY}"
    address = uri.rstrip("/") if not uri.startswith("sqlite:") else UI_ADDRESS
    lines = [f"open {address}{page}"]
    if uri.startswith("sqlite:"):
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        command = str(mlflow_bin) if mlflow_bin.is_file() else f"{sys.executable} -m mlflow"
        lines = [f"{command} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000", f"then {lines[0]}"]
    for key, name in (views or {}).items():
        lines.append(f"{name}: {address}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART&"
                     f"viewStateShareKey={quote(key)}&{VIEW_QUERY}")
    return lines


def browse_text(settings: TrackingConfig, experiment: str, parent_run_id: str) -> str:
    """What a command that ran a pipeline prints last: how to browse its runs (:func:`browse_lines`), with
    the experiment's saved chart views."""
    uri, eid = tracking_uri(settings), experiment_id(settings, experiment)
    views = own_views(MlflowClient(uri).get_experiment(eid).tags)
    lines = browse_lines(uri, eid, views)
    return f"Browse the runs (parent run {parent_run_id}) in MLflow:\n" + "\n".join(f"  {line}" for line in lines)


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


def check_reachable(uri: str, again: bool = False) -> None:
    """Fail within seconds, naming ``tracking.uri``, when a tracking server does not answer (MLflow's own
    client retries for minutes first); once per server and process, unless ``again``. Any HTTP answer
    counts: this asks whether something listens, the first real call whether it lets us in."""
    if not is_server(uri) or (uri in _reachable and not again):
        return
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=PROBE_SECONDS)
    except requests.RequestException as exc:
        reason = "timed out" if isinstance(exc, requests.Timeout) else type(exc).__name__
        raise TrackingUnavailable(f"cannot reach the MLflow tracking server at {uri}; is it running and is "
                                  f"tracking.uri right? ({reason} after {sum(PROBE_SECONDS):.0f} s at most)") from None
    _reachable.add(uri)


@contextmanager
def quick_calls(retries: int = 1, timeout: int = 5) -> Iterator[None]:
    """MLflow's HTTP calls in the body give up after ``retries`` retries of ``timeout`` seconds each (instead
    of about four minutes): for what must not hold a stage up when the server went away (ending a run)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES=str(retries), MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout))
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@contextmanager
def named_failures(uri: str) -> Iterator[None]:
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


@contextmanager
def _first_store_use(uri: str) -> Iterator[None]:
    """Hold a lock beside a SQLite store while this process first opens it: MLflow creates (migrates) a new
    database on first use, and two commands started at once in a fresh folder would both migrate it
    (``duplicate column name``). The second waits, then finds it made."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    with open(f"{uri.removeprefix('sqlite:///')}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _describe(name: str) -> str:
    return (f"# {name}\nLOOM-CFM flow matching runs of loomcfm (`Config.experiment`). Each `loomcfm run` or "
            "pipeline run is a parent run whose description is its base-vs-reflow table, with a child run per "
            "stage (cache, train, evaluate, pairs, train_reflow, evaluate_reflow). Training runs chart their "
            "loss and, with `eval.every_steps`, `during_training/<metric>/<method>`; evaluation runs chart the "
            "distance per solver against NFE (step = NFE), the parent `base/...` and `reflow/...` of both.")


def experiment_id(settings: TrackingConfig, name: str) -> str:
    """Get or create the experiment ``name`` (a config's ``Config.experiment``) and return its id; a new one
    opens in MLflow's model-training view (:data:`EXPERIMENT_KIND`) and has a description.

    Creation tolerates losing a race to another worker creating the same experiment at the same time.
    """
    uri = tracking_uri(settings)
    check_reachable(uri)
    with named_failures(uri), _first_store_use(uri):
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return client.create_experiment(name, artifact_location=artifact_location(settings),
                                                tags={**EXPERIMENT_KIND, NOTE_TAG: _describe(name)})
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


def end_quietly(run: mlflow.ActiveRun, status: str = "FINISHED") -> None:
    """End ``run`` (this process's active run) with ``status``, giving up within seconds with one warning
    when the server is gone: the stage's work is done and must not be lost to its bookkeeping."""
    try:
        with quick_calls():
            mlflow.end_run(status)
    except MlflowException as exc:
        if not _is_connection_failure(exc):
            raise
        log.warning("could not mark MLflow run %s %s: the tracking server did not answer", run.info.run_id, status)
    leave(run)  # end_run took it off the stack already, unless it failed before


@contextmanager
def start_run(settings: TrackingConfig, experiment: str, run_name: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None, run_id: str | None = None, attach: bool = False,
              holders: str | None = None, metrics_seconds: float = 0.0) -> Iterator[mlflow.ActiveRun]:
    """Make ``run_name`` the active MLflow run in the store of ``settings`` (the ``tracking`` section) and the
    experiment ``experiment`` (``Config.experiment``) for the ``with`` body.

    ``parent_run_id`` makes it a child run even in another process (a Ray worker, a KFP pod); pass the id
    explicitly rather than through ``MLFLOW_RUN_ID``, which would make MLflow resume that run instead.
    Inside another active run of this process the parent is implied (``parent_run_id``, if given, must be
    that run). The run is tagged ``loomcfm.stage=<run_name>`` (``tags`` may override) so stages can be found
    across pipeline runs. ``run_id`` reopens an existing run instead (a resumed training keeps logging into
    the run it started).

    With ``holders`` (:func:`loomcfm_core.layout.holders_uri`) the process holds the run
    (:mod:`loomcfm_core.run_status`): it first marks FAILED the runs that dead processes left RUNNING, keeps a
    heartbeat, and ends the run KILLED on SIGINT/SIGTERM (``KeyboardInterrupt``) or FAILED on an error, giving
    a parent that status too. ``attach`` only logs into a run another process holds (Ray workers, into the
    run their driver opened). ``metrics_seconds`` > 0 samples MLflow's system metrics that often.
    """
    uri = tracking_uri(settings)
    mlflow.set_tracking_uri(uri)
    exp_id = experiment_id(settings, experiment)
    client = MlflowClient(uri)
    if holders and not attach:
        reap_dead_runs(client, exp_id, holders)
    if run_id and _run_exists(uri, run_id):
        opened = mlflow.start_run(run_id=run_id, nested=True, log_system_metrics=False)
    else:
        # nested=True: without it MLflow refuses a second run in a process even when parent_run_id names the
        # active one; with no active run it changes nothing.
        opened = mlflow.start_run(experiment_id=exp_id, run_name=run_name, nested=True, parent_run_id=parent_run_id,
                                  tags={STAGE_TAG: run_name, **(tags or {})}, log_system_metrics=False)
    with opened as run:
        if attach:
            try:
                yield run
            finally:
                leave(run)
            return
        parent = parent_run_id or run.data.tags.get("mlflow.parentRunId")
        try:
            with held(holders, client, run.info.run_id) if holders else _nothing(), \
                    system_metrics(uri, run.info.run_id, metrics_seconds):
                yield run
        except BaseException as exc:
            killed = isinstance(exc, KeyboardInterrupt)
            status = KILLED if killed else FAILED
            reason = f"stopped by {stopped_by()}" if killed else f"{type(exc).__name__}: {str(exc)[:200]}"
            try:
                with quick_calls():
                    mlflow.end_run(status)
                    end_as(client, run.info.run_id, status, parent, reason)
            except Exception as tracking_exc:  # noqa: BLE001 - the store may be what failed: keep exc
                log.warning("could not record why run %s ended: %s", run.info.run_id, tracking_exc)
            leave(run)
            raise
        end_quietly(run)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def find_pipeline_run(settings: TrackingConfig, experiment: str, kfp_run_id: str) -> str | None:
    """The parent run a pipeline's first step opened for the KFP run ``kfp_run_id``, or None.

    Steps find their parent this way at run time instead of taking its id as an input, because every input
    is part of KFP's cache key and a per-run id would keep deterministic steps from ever being reused.
    """
    uri = tracking_uri(settings)
    query = f"tags.`{KFP_RUN_TAG}` = '{kfp_run_id}' and tags.`{STAGE_TAG}` = '{PIPELINE_STAGE}'"
    with named_failures(uri):
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
