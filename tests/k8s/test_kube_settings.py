"""The ``kube`` config section: Kubernetes quantities and node selectors as the API server reads them, errors
that name the key, and the launcher's time bound derived from KubeRay's per-attempt deadlines."""

from __future__ import annotations

from decimal import Decimal

import pytest

from loomcfm_core.config import load_config
from loomcfm_core.errors import ConfigError
from loomcfm_core.kube.launcher import time_bound
from loomcfm_core.kube.settings import parse_quantity, parse_selector


def test_quantities_follow_kubernetes_parse_quantity():
    cases = {"500m": Decimal("0.5"), "8": Decimal(8), "2.5": Decimal("2.5"), "16Gi": Decimal(16 * 2**30),
             "1e3": Decimal(1000), "100M": Decimal(10**8), "1Ki": Decimal(1024)}
    for text, value in cases.items():
        assert parse_quantity(text) == value, text
    for bad in ("", "4 cores", "8GB", "1.2.3", "Gi", "5K", "nan"):
        with pytest.raises(ConfigError):
            parse_quantity(bad)


def test_node_selectors_are_label_pairs():
    assert parse_selector("nvidia.com/gpu.present=true, pool=a100") == {"nvidia.com/gpu.present": "true",
                                                                          "pool": "a100"}
    assert parse_selector("") == {}
    for bad in ("gpu", "=x", "a=b c", "a/b/c=d"):
        with pytest.raises(ConfigError):
            parse_selector(bad)


def test_bad_kube_settings_name_their_key():
    for override, key in (("kube.worker_cpu=0", "kube.worker_cpu"), ("kube.worker_memory=lots", "kube.worker_memory"),
                          ("kube.gpus_per_worker=-1", "kube.gpus_per_worker"), ("kube.active_deadline_s=0",
                                                                                 "kube.active_deadline_s"),
                          ("kube.namespace=Team_A", "kube.namespace"), ("kube.on_terminate=stay", "kube.on_terminate")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("digits", [override])
    assert load_config("digits", ["kube.worker_cpu=8"]).kube.worker_cpu == "8", "a quantity stays text"


def test_the_launchers_bound_counts_every_attempt():
    kube = load_config("digits", ["kube.active_deadline_s=3600", "kube.backoff_limit=2"]).kube
    assert kube.attempts == 3
    assert time_bound(kube, teardown_s=300, margin_s=600) == 3 * 3600 + 2 * 300 + 600
