"""The pieces of a training step: the learning-rate schedule, the EMA and one step on a tiny model."""

import torch

from loomcfm_core.config import load_config
from loomcfm_core.training.step import EMA, build_state, train_step, warmup_lambda
from tests.training import TINY


def test_warmup_then_constant():
    lam = warmup_lambda(4)
    assert [lam(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_lambda(0)(0) == 1.0


def test_ema_moves_a_one_minus_decay_share_towards_the_weights():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for old, new, target in zip(before, ema.model.parameters(), model.parameters()):
        torch.testing.assert_close(new, old + 0.1 * (target - old))
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training


def test_a_step_updates_weights_ema_schedule_and_loom_table():
    cfg = load_config("digits", [*TINY, "train.warmup_steps=4", "train.ema_decay=0.5"])
    state = build_state(cfg, num_points=16, device=torch.device("cpu"))
    table = state.coupling.table.clone()
    weights = [p.clone() for p in state.raw.parameters()]
    x1 = torch.rand(8, *cfg.data.shape) * 2 - 1
    metrics = train_step(state, x1, torch.arange(8))
    assert state.step == 1 and set(metrics) == {"loss", "grad_norm", "cost_before", "cost_after", "swaps"}
    assert metrics["loss"].item() > 0 and metrics["cost_after"] <= metrics["cost_before"] + 1e-9
    assert state.scheduler.get_last_lr() == [cfg.train.lr * 2 / 4], "warm-up: the second step runs at 2/4"
    changed = [not torch.equal(a, b) for a, b in zip(weights, state.raw.parameters())]
    assert any(changed)
    for w, p, e in zip(weights, state.raw.parameters(), state.ema.model.parameters()):
        torch.testing.assert_close(e, 0.5 * w + 0.5 * p.detach())
    assert sorted(state.coupling.table.flatten().tolist()) == sorted(table.flatten().tolist()), "seeds permuted"
