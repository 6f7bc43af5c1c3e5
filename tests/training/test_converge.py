"""``coupling.converge_epochs``: LOOM reassignment passes before training, logged, and resumable exactly."""

import pytest
import torch
from mlflow.tracking import MlflowClient

from loomcfm_core import tracking
from loomcfm_core.checkpoint import load_checkpoint
from loomcfm_core.config import load_config
from loomcfm_core.data.cache import cache_dataset
from loomcfm_core.errors import ConfigError
from loomcfm_core.training import converge as converge_module
from loomcfm_core.training.loop import fit
from tests.training import TINY

PASSES = 3


def _cfg(tmp_path, *extra):
    return load_config("digits", TINY + [f"storage.root={tmp_path}/store", f"tracking.local_dir={tmp_path}/runs",
                                         "train.max_steps=2", "coupling.num_seeds=2",
                                         f"coupling.converge_epochs={PASSES}", *extra])


def test_convergence_lowers_the_table_cost_every_pass_and_is_logged(tmp_path):
    cfg = _cfg(tmp_path)
    summary = fit(cfg, cache_dataset(cfg).uri, f"{tmp_path}/store/runs/c", torch.device("cpu"))
    client = MlflowClient(tracking.tracking_uri(cfg.tracking))
    history = sorted(client.get_metric_history(summary.mlflow_run_id, "coupling/table_cost"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(PASSES + 1)), "before the first pass, then after each"
    costs = [m.value for m in history]
    assert all(after < before for before, after in zip(costs, costs[1:])), costs
    assert costs[-1] < 0.99 * costs[0], "reassignment is not a rounding effect"
    artifacts = [a.path for a in client.list_artifacts(summary.mlflow_run_id, "coupling")]
    assert artifacts == ["coupling/converge.png"]
    assert load_checkpoint(f"{tmp_path}/store/runs/c/converge.pt")["costs"] == pytest.approx(costs)
    assert summary.step == 2, "training follows"


def test_an_interrupted_convergence_resumes_to_the_same_table_and_model(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    dataset_uri = cache_dataset(cfg).uri
    whole = fit(cfg, dataset_uri, f"{tmp_path}/store/runs/whole", torch.device("cpu"))

    written = []
    original = converge_module.write_state

    def stop_after_two_passes(state, uri):
        original(state, uri)
        written.append(uri)
        if len(written) == 2:
            raise KeyboardInterrupt("stopped after pass 2")

    monkeypatch.setattr(converge_module, "write_state", stop_after_two_passes)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, dataset_uri, f"{tmp_path}/store/runs/cut", torch.device("cpu"))
    monkeypatch.setattr(converge_module, "write_state", original)
    assert len(load_checkpoint(f"{tmp_path}/store/runs/cut/converge.pt")["costs"]) == 3, "passes 0..2 recorded"
    resumed = fit(cfg, dataset_uri, f"{tmp_path}/store/runs/cut", torch.device("cpu"))

    assert resumed.table_hashes == whole.table_hashes
    a, b = load_checkpoint(whole.checkpoint_uri), load_checkpoint(resumed.checkpoint_uri)
    assert torch.equal(a["coupling"]["table"], b["coupling"]["table"])
    for key, value in a["ema"].items():
        assert torch.equal(value, b["ema"][key]), key
    costs = [load_checkpoint(f"{tmp_path}/store/runs/{name}/converge.pt")["costs"] for name in ("whole", "cut")]
    assert costs[0] == costs[1]
    history = MlflowClient(tracking.tracking_uri(cfg.tracking)).get_metric_history(resumed.mlflow_run_id,
                                                                          "coupling/table_cost")
    assert sorted(m.step for m in history) == list(range(PASSES + 1)), "the resumed run continues the same curve"


def test_converge_epochs_needs_loom(tmp_path):
    with pytest.raises(ConfigError, match="coupling.converge_epochs=2 needs coupling.kind=loom"):
        load_config("digits", ["coupling.kind=fixed", "coupling.converge_epochs=2"])
