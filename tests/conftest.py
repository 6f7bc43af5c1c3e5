"""Shared fixtures: real servers on 127.0.0.1 (moto's S3 server, an MLflow server), started once per test session."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import NamedTuple

from unittest import mock

import boto3
import pytest
import torch

from loomcfm_core import stages
from loomcfm_core.config import load_config
from loomcfm_core.training.loop import fit
from tests.run_cli import forget_ray_token

pytest_plugins = ["tests.cost"]


def pytest_configure(config):
    """One intra-op thread in this process and in every process it starts (a ``loomcfm`` command, a kfp.local
    step; Ray gives its workers one per CPU already): the networks here are tiny, where a second thread only
    adds synchronisation, and two threads spinning on a loaded 2-core machine (or beside an xdist worker)
    make every step several times slower. Nothing a test checks depends on the thread count."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# A digits network small enough to train a few steps of on a CPU in a test, as ``--set`` overrides.
SMALL = ["model.channels=32", "model.channel_mult=[1,2]", "model.attn_resolutions=[]", "train.max_steps=3",
         "train.batch_size=16"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """The digits dataset cached once per session by the cache stage, with what evaluation needs beside it
    (the feature classifier, its reference statistics): about 20 s that every test needing them would
    otherwise spend again. Tests get a copy of it in their own storage root (:func:`store`)."""
    root = tmp_path_factory.mktemp("digits")
    cfg = load_config("digits", [f"storage.root={root / 'store'}", f"tracking.local_dir={root / 'runs'}",
                                 f"data.local_cache={root / 'node'}"])
    return stages.cache(cfg)


@pytest.fixture(scope="session")
def digits_dataset(digits_cache) -> Path:
    """The folder of :func:`digits_cache`'s dataset (read only: copy it to change it)."""
    return Path(digits_cache.dataset_uri)


@pytest.fixture()
def store(tmp_path, digits_dataset) -> Path:
    """``tmp_path/store``: a storage root in which the digits dataset is cached already (a copy of the
    session's, so a test may damage or extend it), for ``--set storage.root=...``."""
    shutil.copytree(digits_dataset, tmp_path / "store" / "datasets" / digits_dataset.name)
    return tmp_path / "store"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, digits_dataset) -> Path:
    """The run folder of a 3-step digits training of the ``SMALL`` network (its checkpoint is
    ``checkpoints/step-00000003.pt``), trained once per session; tests get a copy (:func:`checkpoint`)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = load_config("digits", [*SMALL, f"storage.root={root / 'store'}", f"data.local_cache={root / 'node'}"])
    fit(cfg, str(digits_dataset), str(root / "run"), torch.device("cpu"))
    return root / "run"


@pytest.fixture()
def checkpoint(tmp_path, store, trained_run) -> str:
    """The last checkpoint of a 3-step digits training with the ``SMALL`` network, in a run folder
    ``store/runs/s`` of the test's own (evaluations write beside it), the dataset cached in ``store``."""
    run = store / "runs" / "s"
    shutil.copytree(trained_run, run)
    return str(run / "checkpoints" / "step-00000003.pt")


@pytest.fixture()
def random_inception(tmp_path):
    """TF-Inception weights from a seeded, randomly initialised network (the real ones cannot be downloaded)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path / "weights" / "pt_inception-2015-12-05.pth"
    path.parent.mkdir()
    torch.save(net.state_dict(), path)
    return path


def inception_cfg(tmp_path, weights, *extra):
    """A digits config scoring with Inception ``weights`` (batches of 4), node-local copies under tmp_path."""
    return load_config("digits", [f"eval.inception_weights={weights}", "eval.feature_network=inception",
                                  f"data.local_cache={tmp_path / 'node'}", "eval.batch_size=4", *extra])


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """A real moto S3 server process; yields its endpoint URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture()
def s3_env(moto_server, monkeypatch):
    """Point the standard AWS variables at the moto server with dummy credentials."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return moto_server


@pytest.fixture()
def s3_bucket(s3_env) -> str:
    """A fresh, empty bucket on the moto server; yields its name."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return name


@pytest.fixture(autouse=True, scope="module")
def _no_local_ray_left():
    """A stage run in-process starts a local Ray as the CLI does (``training.local_ray.connect``); the CLI stops it
    when the command ends, a test module stops it here, so the next module (or its own ``ray.init``) starts
    without a Ray it did not ask for."""
    yield
    if "ray" in sys.modules:
        from loomcfm_core.training.local_ray import stop_local_ray

        stop_local_ray()
        forget_ray_token()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Keep node-local caches and default stores inside the test's tmp folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    yield Path(tmp_path)


class MlflowServer(NamedTuple):
    url: str
    bucket: str
    log: Path

    def log_tail(self, chars: int = 8000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"


@pytest.fixture(scope="session")
def mlflow_server(moto_server, tmp_path_factory):
    """A real ``mlflow server`` (SQLite backend, artifacts proxied to a moto S3 bucket); yields MlflowServer.

    Its log goes to a file, shown in the report of any failing test that uses the server.
    """
    root = tmp_path_factory.mktemp("mlflow")
    bucket = f"mlflow-{uuid.uuid4().hex[:12]}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=moto_server, aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
                 region_name=creds["AWS_DEFAULT_REGION"]).create_bucket(Bucket=bucket)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(creds, HOME=str(root / "home"), MLFLOW_S3_ENDPOINT_URL=moto_server, AWS_ENDPOINT_URL=moto_server,
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    port = free_port()
    log = root / "server.log"
    with open(log, "w") as out:
        # own session: `mlflow server` runs uvicorn as a child, and teardown must stop both
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server",
                                 "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                 "--artifacts-destination", f"s3://{bucket}/mlartifacts",
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", bucket, log)
    try:
        wait_for_health(server.url, proc)
    except RuntimeError as exc:
        _stop_group(proc)
        raise RuntimeError(f"{exc}\n--- mlflow server log ({log}) ---\n{server.log_tail()}") from None
    try:
        yield server
    finally:
        _stop_group(proc)


def wait_for_health(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url}/health answered")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}/health did not answer within {timeout}s")


def _stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the MLflow server's log to the report of a failing test that used the server."""
    outcome = yield
    report = outcome.get_result()
    server = getattr(item, "funcargs", {}).get("mlflow_server")
    if report.failed and isinstance(server, MlflowServer):
        report.sections.append(("mlflow server log", server.log_tail()))
