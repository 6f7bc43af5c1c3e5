"""The coupling decided ahead on a host thread: bit-identical to deciding it in the step, resume included."""

import torch

from loomcfm_core.checkpoint import list_checkpoints, load_checkpoint
from loomcfm_core.config import load_config
from loomcfm_core.coupling import SeedCoupling
from loomcfm_core.data.cache import cache_dataset
from loomcfm_core.data.dataset import ShardedDataset
from loomcfm_core.data.latents import POSTERIOR_SEED_OFFSET, cache_latents
from loomcfm_core.storage import to_local_path
from loomcfm_core.training import loop
from loomcfm_core.training.loop import fit
from loomcfm_core.training.pipelined import CouplingPlanner
from tests.data.shapes import shapes_folder
from tests.models.autoencoders import latent_config, save_folder, tiny_kl
from tests.training import TINY


def _fit(tmp_path, name, *overrides, uri=None):
    """Train on 40 generated 3x8x8 pictures (a 5-step epoch at batch 8): enough batches to span problems,
    cut units at checkpoints and epochs, and stop mid-epoch, each in a few steps."""
    images = tmp_path / "shapes"
    if not images.is_dir():
        shapes_folder(images, 20, 2, size=8)
    cfg = load_config("digits", TINY + [f"storage.root={tmp_path}/store", f"tracking.local_dir={tmp_path}/runs",
                                        f"data.source=imagefolder:{images}", "data.name=shapes", "data.channels=3",
                                        "train.batch_size=8", "train.checkpoint_every=7", "train.keep_checkpoints=5",
                                        *overrides])
    uri = uri or cache_dataset(cfg).uri
    return fit(cfg, uri, f"{tmp_path}/store/runs/{name}", torch.device("cpu")), uri


def _assert_same_run(a, b):
    a, b = load_checkpoint(a.checkpoint_uri), load_checkpoint(b.checkpoint_uri)
    assert a["step"] == b["step"]
    assert [set(r) for r in a["rng"]] == [set(r) for r in b["rng"]]
    for ra, rb in zip(a["rng"], b["rng"]):
        for key in ra:
            assert torch.equal(ra[key], rb[key]), f"rng {key}"
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
    """Spanning problems (2 global batches of 8 under max_problem=16), units cut by checkpoints every 7 steps,
    a 5-step epoch: the pipelined loop equals the unpipelined one bit for bit; a run stopped at step 14
    (mid-epoch) and resumed to 20 equals the uninterrupted one."""
    common = ["coupling.max_problem=16", "train.max_steps=20"]
    straight, uri = _fit(tmp_path, "straight", *common, "coupling.pipelined=false")
    pipelined, _ = _fit(tmp_path, "pipelined", *common, uri=uri)
    _assert_same_run(straight, pipelined)
    assert straight.metrics["coupling/swaps"] > 0

    # stopped after the checkpoint at step 14 (a later one, at 16, is lost with the crash), then rerun
    first, _ = _fit(tmp_path, "resumed", "coupling.max_problem=16", "train.max_steps=16", uri=uri)
    run_uri = first.run_uri
    to_local_path(f"{run_uri}/checkpoints/step-00000016.pt").unlink()
    to_local_path(f"{run_uri}/result.json").unlink()
    assert [s for s, _ in list_checkpoints(run_uri)][-1] == 14
    resumed, _ = _fit(tmp_path, "resumed", *common, uri=uri)
    _assert_same_run(straight, resumed)


def test_bounded_problems_train_the_same_with_and_without_the_pipeline(tmp_path):
    """A global batch above the cap (8 > 3): every problem is a rank's local batch in pieces of <= 3."""
    a, uri = _fit(tmp_path, "a", "coupling.max_problem=3", "train.max_steps=6", "coupling.pipelined=false")
    b, _ = _fit(tmp_path, "b", "coupling.max_problem=3", "train.max_steps=6", uri=uri)
    _assert_same_run(a, b)


def _record(monkeypatch):
    """Record the x1 of every batch the coupling plans (on whichever thread) and of every training step."""
    planned, trained = [], []
    plan, step = SeedCoupling.plan, loop.train_step

    def recording_plan(self, batches, *args, **kwargs):
        planned.extend(x1.clone() for x1, _ in batches)
        return plan(self, batches, *args, **kwargs)

    def recording_step(state, x1, index, assigned=None):
        trained.append((x1.clone(), index.clone()))
        return step(state, x1, index, assigned)

    monkeypatch.setattr(SeedCoupling, "plan", recording_plan)
    monkeypatch.setattr(loop, "train_step", recording_step)
    return planned, trained


def test_latent_training_couples_the_latents_it_trains_on_and_resumes_exactly(tmp_path, monkeypatch):
    """Latent LOOM (posterior draws of a KL cache) with spanning problems (2 global batches of 8 under
    max_problem=16), units cut by checkpoints every 5 steps and by 6-step epochs: every batch the coupling
    planned is exactly the batch the step trained on, those are ``(mean + std * eps) / scale`` with eps drawn in
    training order from the rank's posterior generator, pipelined and unpipelined runs are bit-identical
    (tables, generators, posterior generator, weights), and a run stopped after its step-5 checkpoint and
    resumed equals the uninterrupted one."""
    weights = save_folder(tiny_kl(channels=(8, 16, 16, 16), groups=4), tmp_path / "kl")
    images = shapes_folder(tmp_path / "shapes", 12, 2)

    def config(*extra):
        return latent_config(tmp_path, weights, *TINY, f"data.source=imagefolder:{images}", "data.name=shapes",
                             "data.hflip=true", f"storage.root={tmp_path}/store", f"tracking.local_dir={tmp_path}/runs",
                             "train.batch_size=8", "coupling.kind=loom", "coupling.num_seeds=2",
                             "coupling.max_problem=16", "train.checkpoint_every=5", "train.keep_checkpoints=5",
                             "train.warmup_steps=2", "train.log_every=2", *extra)

    cfg = config()
    uri = cache_latents(cfg, cache_dataset(cfg)).uri

    def run(name, max_steps, pipelined):
        run_cfg = config(f"train.max_steps={max_steps}", f"coupling.pipelined={pipelined}")
        with monkeypatch.context() as patch:
            planned, trained = _record(patch)
            summary = fit(run_cfg, uri, f"{tmp_path}/store/runs/{name}", torch.device("cpu"))
        assert len(planned) == len(trained) and all(torch.equal(p, x) for p, (x, _) in zip(planned, trained)), \
            "the coupling planned on other latents than the step trained on"
        return summary, trained

    straight, trained = run("straight", 14, "false")
    assert straight.metrics["coupling/swaps"] > 0
    dataset = ShardedDataset(uri, "train", hflip=True)
    scale, generator = dataset.manifest["latent_space"]["scale"], torch.Generator().manual_seed(
        cfg.train.seed * 1000 + POSTERIOR_SEED_OFFSET)
    for x1, index in trained:
        rows = torch.stack([dataset[int(i)][0] for i in index])
        eps = torch.randn(rows[:, 0].shape, generator=generator)
        assert torch.equal(x1, (rows[:, 0] + rows[:, 1] * eps) / scale)

    pipelined, piped = run("pipelined", 14, "true")
    _assert_same_run(straight, pipelined)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(trained, piped)) and len(piped) == 14

    first, _ = run("resumed", 8, "true")  # checkpoints at 5 and 8; the one at 8 is lost with the crash
    to_local_path(f"{first.run_uri}/checkpoints/step-00000008.pt").unlink()
    to_local_path(f"{first.run_uri}/result.json").unlink()
    resumed, after = run("resumed", 14, "true")
    _assert_same_run(straight, resumed)
    assert len(after) == 9 and all(torch.equal(a, b) for (a, _), (b, _) in zip(trained[5:], after))
