"""MLflow trouble costs tracking data at most (issue 22): a tracking.uri that is malformed or does not answer is
one line within seconds, before any work; a server that goes away during a training neither stops nor stalls
it; two commands started at once in a fresh folder share the new SQLite store."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from loomcfm_core import metric_sink
from loomcfm_core.config import load_config
from loomcfm_core.training import loop
from loomcfm_core.training.result import read_result
from tests.conftest import SMALL, free_port
from tests.run_cli import call, error_line, sets


def _silent_server() -> tuple[socket.socket, str]:
    """Something that accepts connections and never answers (a hung server, a black-holing proxy)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("case", ["no scheme", "refused", "never answers"])
def test_a_bad_tracking_uri_is_one_line_before_any_work(tmp_path, case):
    silent = None
    if case == "no scheme":
        uri, code, says = "127.0.0.1:9", 2, "tracking.uri: '127.0.0.1:9' is not an MLflow tracking URI"
    elif case == "refused":
        uri, code, says = f"http://127.0.0.1:{free_port()}", 1, "cannot reach the MLflow tracking server at"
    else:
        silent, uri = _silent_server()
        code, says = 1, "cannot reach the MLflow tracking server at"
    started = time.monotonic()
    try:
        proc = call("cache", *sets(f"tracking.uri={uri}", f"storage.root={tmp_path}/store"))
    finally:
        if silent:
            silent.close()
    assert time.monotonic() - started < 10
    assert proc.returncode == code and says in error_line(proc) and "tracking.uri" in error_line(proc)
    assert not (tmp_path / "store").exists(), "nothing was cached before the tracking store was checked"


class _Proxy:
    """A TCP forwarder on 127.0.0.1 in front of the real MLflow server: stopping it (the listener and every open
    connection) is the server going away for this client, starting it again on the same port is the server
    coming back."""

    def __init__(self, target_port: int) -> None:
        self.target, self.port, self._open = target_port, free_port(), []

    def start(self) -> None:
        self._open = [socket.create_server(("127.0.0.1", self.port), reuse_port=True)]
        threading.Thread(target=self._accept, args=(self._open[0],), daemon=True).start()

    def stop(self) -> None:
        for sock in self._open:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            sock.close()


def test_a_tracking_server_going_away_mid_training_costs_metrics_at_most(tmp_path, digits_dataset, mlflow_server,
                                                                         caplog, monkeypatch):
    """The server goes away after the first checkpoint, comes back after the second and goes away for good
    after the third: the training runs to its end all the same, what it logged while the server was away the
    first time arrives once it is back, and what it could not send at the end is said once. (Each step is
    made to last 0.3 s, and the sender retries every 0.1 s, so that it meets each state of the server.)"""
    real_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *args: (time.sleep(0.3), real_step(*args))[1])
    monkeypatch.setattr(metric_sink, "RETRY_SECONDS", 0.1)
    proxy = _Proxy(int(mlflow_server.url.rsplit(":", 1)[1]))
    proxy.start()
    cfg = load_config("digits", [*SMALL, "train.max_steps=8", "train.checkpoint_every=2", "train.log_every=1",
                                 f"tracking.uri=http://127.0.0.1:{proxy.port}", "tracking.experiment=outage",
                                 f"storage.root={tmp_path}/store", "tracking.system_metrics_seconds=0"])
    run = tmp_path / "store" / "runs" / "r"

    def outages() -> None:
        for step, change in ((2, proxy.stop), (4, proxy.start), (6, proxy.stop)):
            while not (run / "checkpoints" / f"step-{step:08d}.pt").exists():
                time.sleep(0.02)
            change()

    threading.Thread(target=outages, daemon=True).start()
    caplog.set_level(logging.WARNING)
    started = time.monotonic()
    result = loop.fit(cfg, str(digits_dataset), str(run), torch.device("cpu"))
    assert time.monotonic() - started < 120
    assert result.step == 8 and read_result(str(run)) == result and Path(result.checkpoint_uri).is_file()
    said = [r.getMessage() for r in caplog.records]
    assert any("is back after" in line for line in said), said
    lost = [line for line in said if " lost " in line]
    assert len(lost) == 1 and f"MLflow run {result.mlflow_run_id} lost" in lost[0], said
    logged = [m.step for m in MlflowClient(mlflow_server.url).get_metric_history(result.mlflow_run_id, "train/loss")]
    # a batch the server took but whose answer the outage cut off is sent again (MLflow's log-batch has no
    # idempotency key), so a step may be there twice, but none of the first outage's is missing
    assert sorted(set(logged))[:4] == [1, 2, 3, 4] and max(logged) < 8, \
        "the first outage's metrics were logged once it was back"


@pytest.mark.process
def test_two_commands_at_once_in_a_fresh_folder_share_the_new_store(tmp_path):
    """MLflow migrates a new SQLite store on first use; two processes doing it at once failed with
    ``duplicate column name`` (alembic, both migrating)."""
    script = textwrap.dedent(f"""
        import pathlib, sys, time
        from loomcfm_core.config import Config
        from loomcfm_core.tracking import experiment_id
        cfg = Config(tracking={{"local_dir": {str(tmp_path / 'runs')!r}}})
        pathlib.Path(sys.argv[1] + ".ready").touch()
        while len(list(pathlib.Path({str(tmp_path)!r}).glob("*.ready"))) < 2:  # both past their imports
            time.sleep(0.005)
        print(experiment_id(cfg.tracking, sys.argv[1]))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, f"exp-{i}"], stdout=subprocess.PIPE, cwd=tmp_path,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert {client.get_experiment_by_name(f"exp-{i}").experiment_id for i in range(2)} == \
        {out.strip().splitlines()[-1] for out, _ in outs}
