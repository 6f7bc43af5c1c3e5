"""Copying the driver's log (loomcfm_core/kube/logs.py) from a submitter pod through the real ``kubernetes``
client and the API server of tests/k8s/apiserver.py: every line once, in order, also when lines share a
timestamp (the kubelet stamps each line as it reads it, so a burst can carry one time, and a read can fall
inside the burst)."""

from __future__ import annotations

import datetime

from loomcfm_core.kube.client import connect
from loomcfm_core.kube.logs import DriverLog
from tests.k8s.apiserver import ApiServer, now

NS = "ml"


def test_every_driver_line_is_copied_once_also_when_lines_share_a_timestamp(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="loomcfm_core.kube.driver")
    with ApiServer() as server:
        monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig", NS)))
        for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
            monkeypatch.delenv(var, raising=False)
        store = server.store
        store.create("pods", NS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": "rj-abcde", "labels": {"job-name": "rj"}}, "spec": {"containers": []}})
        store.create("pods", NS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": "other-fghjk", "labels": {"job-name": "other"}}, "spec": {"containers": []}})
        store.log(NS, "other-fghjk", "not this RayJob's")
        driver = DriverLog(connect(NS), "rj")
        lines = store.logs[(NS, "rj-abcde")]
        moment = now()
        lines += [(moment, "epoch 1"), (moment, "epoch 2")]
        driver.copy_new()
        lines.append((moment, "epoch 3"))  # the same time as the last line read: it arrived after the read
        driver.copy_new()
        lines.append((moment + datetime.timedelta(microseconds=1), "epoch 4"))
        driver.copy_new()
        driver.copy_new()
    assert driver.tail() == "epoch 1\nepoch 2\nepoch 3\nepoch 4"
    assert [r.getMessage() for r in caplog.records] == [f"[rj] epoch {n}" for n in range(1, 5)]
