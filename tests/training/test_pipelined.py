"""The coupling decided ahead on a host thread: bit-identical to deciding it in the step, resume included."""

import torch

from loomcfm_core.checkpoint import list_checkpoints, load_checkpoint
from loomcfm_core.config import load_config
from loomcfm_core.coupling import SeedCoupling
from loomcfm_core.data.cache import cache_dataset
from loomcfm_core.storage import to_local_path
from loomcfm_core.training.loop import fit
from loomcfm_core.training.pipelined import CouplingPlanner
from tests.training import TINY


def _fit(tmp_path, name, *overrides, uri=None):
    cfg = load_config("digits", TINY + [f"storage.root={tmp_path}/store", f"tracking.local_dir={tmp_path}/runs",
                                        "train.checkpoint_every=7", "train.keep_checkpoints=5", *overrides])
    uri = uri or cache_dataset(cfg).uri
    return fit(cfg, uri, f"{tmp_path}/store/runs/{name}", torch.device("cpu")), uri


def _assert_same_run(a, b):
    a, b = load_checkpoint(a.checkpoint_uri), load_checkpoint(b.checkpoint_uri)
    assert a["step"] == b["step"]
    assert torch.equal(a["coupling"]["table"], b["coupling"]["table"])
    assert torch.equal(a["coupling"]["generator"], b["coupling"]["generator"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"][key], b["ema"][key]), key


def test_units_close_at_checkpoints_and_at_the_end():
    coupling = SeedCoupling("loom", 100, 1, (1, 1, 1), max_problem=12)
    planner = CouplingPlanner(coupling, local_batch=4, checkpoint_every=5, total_steps=11)
    assert planner.span == 3
    batches = iter([(torch.zeros(4, 1, 1, 1), None, torch.arange(4 * i, 4 * i + 4)) for i in range(20)])
    units = list(planner._units(batches, step=0))
    assert [len(u.batches) for u in units] == [3, 2, 3, 2, 1]  # checkpoints after steps 5, 10 and 11 (the end)
    assert [u.ends_at_checkpoint for u in units] == [False, True, False, True, True]


def test_pipelined_training_is_bit_identical_and_resumes_exactly(tmp_path):
    """Spanning problems (2 global batches of 32 under max_problem=64), units cut by checkpoints every 7 steps,
    a 46-step epoch: the pipelined loop equals the unpipelined one bit for bit; a run stopped at step 21
    (mid-epoch) and resumed to 60 equals the uninterrupted one."""
    common = ["coupling.max_problem=64", "train.max_steps=60"]
    straight, uri = _fit(tmp_path, "straight", *common, "coupling.pipelined=false")
    pipelined, _ = _fit(tmp_path, "pipelined", *common, uri=uri)
    _assert_same_run(straight, pipelined)
    assert straight.metrics["coupling/swaps"] > 0

    # stopped after the checkpoint at step 21 (a later one, at 25, is lost with the crash), then rerun
    first, _ = _fit(tmp_path, "resumed", "coupling.max_problem=64", "train.max_steps=25", uri=uri)
    run_uri = first.run_uri
    to_local_path(f"{run_uri}/checkpoints/step-00000025.pt").unlink()
    to_local_path(f"{run_uri}/result.json").unlink()
    assert [s for s, _ in list_checkpoints(run_uri)][-1] == 21
    resumed, _ = _fit(tmp_path, "resumed", *common, uri=uri)
    _assert_same_run(straight, resumed)


def test_bounded_problems_train_the_same_with_and_without_the_pipeline(tmp_path):
    """A global batch above the cap (32 > 20): every problem is a rank's local batch in pieces of <= 20."""
    a, uri = _fit(tmp_path, "a", "coupling.max_problem=20", "train.max_steps=12", "coupling.pipelined=false")
    b, _ = _fit(tmp_path, "b", "coupling.max_problem=20", "train.max_steps=12", uri=uri)
    _assert_same_run(a, b)
