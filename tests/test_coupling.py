"""LOOM and its baselines: the invariants of the method, and noise regenerated from seeds."""

import threading
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.optimize import linear_sum_assignment

from loomcfm_core.coupling import SeedCoupling, make_coupling, noise_from_seeds, random_seeds
from loomcfm_core.coupling_solve import cost_matrix


class ThreadGather:
    """all_gather for ranks simulated as threads: concatenates every rank's tensor in rank order."""

    def __init__(self, world_size):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size)
        self.slots = [None] * world_size

    def for_rank(self, rank):
        def gather(tensor):
            self.slots[rank] = tensor
            self.barrier.wait()
            out = torch.cat(self.slots)
            self.barrier.wait()
            return out
        return gather

    def broadcast_for(self, rank):
        def broadcast(tensor):
            self.slots[rank] = tensor
            self.barrier.wait()
            out = self.slots[0].clone()
            self.barrier.wait()
            return out
        return broadcast


def run_ranks(couplings, units, gather):
    """Each simulated rank plans its slices of every unit of global batches, concurrently."""
    results = [[] for _ in couplings]
    errors = []

    def work(rank):
        try:
            for unit in units[rank]:
                results[rank].append(couplings[rank].plan(unit, gather=gather.for_rank(rank),
                                                          broadcast=gather.broadcast_for(rank)))
        except Exception as exc:  # surfaced below
            errors.append(exc)
            gather.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(couplings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def rank_units(points, world_size, local_batch, span, steps, seed):
    """``steps`` units of ``span`` global batches, disjoint within a unit (an epoch's), cut into rank slices."""
    order_rng = np.random.default_rng(seed)
    global_batch = local_batch * world_size
    units = [[] for _ in range(world_size)]
    for _ in range(steps):
        order = torch.from_numpy(order_rng.permutation(len(points))[:global_batch * span])
        for r in range(world_size):
            slices = [order[b * global_batch + r * local_batch:b * global_batch + (r + 1) * local_batch]
                      for b in range(span)]
            units[r].append([(points[idx], idx) for idx in slices])
    return units


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_images=st.integers(2, 24), num_seeds=st.integers(1, 4), local_batch=st.integers(1, 6),
       world_size=st.integers(1, 3), hflip=st.booleans(), steps=st.integers(1, 10),
       cost=st.sampled_from(["l2", "sqeuclidean"]), seed=st.integers(0, 2**16),
       max_problem=st.one_of(st.none(), st.integers(1, 20)), span=st.integers(1, 3),
       solver=st.sampled_from(["lapjv", "scipy"]))
def test_loom_permutes_seeds_and_never_increases_cost(num_images, num_seeds, local_batch, world_size, hflip,
                                                      steps, cost, seed, max_problem, span, solver):
    """Any split: one global problem, the union of ``span`` batches, or (above ``max_problem``) one problem per
    rank in pieces of at most the cap. Tables stay identical on every rank, the seeds are only permuted and
    the table's float64 total cost never rises."""
    rng = torch.Generator().manual_seed(seed)
    images = torch.rand(num_images, 1, 3, 2, generator=rng) * 2 - 1
    points = torch.cat([images, images.flip(-1)]) if hflip else images
    n = len(points)
    local_batch = min(local_batch, n // world_size)
    if local_batch == 0:
        return
    global_batch = local_batch * world_size
    fits = max_problem is None or global_batch * span <= max_problem
    span = min(span, n // global_batch) if fits else 1
    couplings = [SeedCoupling("loom", n, num_seeds, (1, 3, 2), cost, seed=seed, rank=r, world_size=world_size,
                              max_problem=max_problem, solver=solver) for r in range(world_size)]
    assert couplings[0].span(local_batch) == (1 if not max_problem else max(1, max_problem // global_batch))
    multiset = Counter(couplings[0].table.flatten().tolist())
    costs = [couplings[0].total_cost(points).item()]
    units = rank_units(points, world_size, local_batch, span, steps, seed)
    for step in range(steps):
        results = run_ranks(couplings, [[u[step]] for u in units], ThreadGather(world_size))
        costs.append(couplings[0].total_cost(points).item())
        for other in couplings[1:]:
            assert torch.equal(other.table, couplings[0].table), "ranks' tables diverged"
        for rank, planned in enumerate(results):
            for (_, index), assigned in zip(units[rank][step], planned[0]):
                # each item trains with a seed its row now holds
                assert (couplings[0].table[index] == assigned.seeds[:, None]).any(dim=1).all()
    assert Counter(couplings[0].table.flatten().tolist()) == multiset, "seeds must only be permuted"
    assert all(b <= a + 1e-9 * max(1.0, abs(a)) for a, b in zip(costs, costs[1:])), costs


def _loom_step_before_bounded_problems(table, generator, x1, index, cost):
    """LOOM's step as it was before bounded problems (5b55e53, one rank): float64 costs, scipy, no cycle check."""
    slots = torch.randint(table.shape[1], (len(x1),), generator=generator)
    seeds = table[index, slots]
    dist = torch.cdist(x1.flatten(1).double()[None], noise_from_seeds(seeds, x1.shape[1:]).flatten(1).double()[None])[0]
    _, perm = linear_sum_assignment((dist.square() if cost == "sqeuclidean" else dist).numpy())
    table[index, slots] = seeds[torch.from_numpy(perm)]


@pytest.mark.parametrize("solver", ["lapjv", "scipy"])
@pytest.mark.parametrize("world_size", [1, 3])
def test_cap_at_or_above_the_global_batch_is_the_method_as_before(solver, world_size):
    """Without ties (continuous random data) the optimum is unique: float32 costs, either solver and the
    cycle check change nothing, whatever the number of ranks, for any cap from the global batch to just below
    two global batches (beyond that, batches are joined)."""
    points = torch.randn(96, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    local = 8
    for cap in (local * world_size, 2 * local * world_size - 1):
        reference = SeedCoupling("loom", 96, 2, (2, 3, 3), seed=4)
        generator = torch.Generator().manual_seed(4)
        random_seeds(96 * 2, generator)  # the table's draw
        couplings = [SeedCoupling("loom", 96, 2, (2, 3, 3), seed=4, rank=r, world_size=world_size,
                                  max_problem=cap, solver=solver) for r in range(world_size)]
        units = rank_units(points, world_size, local, 1, 12, seed=7)
        run_ranks(couplings, units, ThreadGather(world_size))
        for step in range(12):
            index = torch.cat([units[r][step][0][1] for r in range(world_size)])
            _loom_step_before_bounded_problems(reference.table, generator, points[index], index, "l2")
        for coupling in couplings:
            assert torch.equal(coupling.table, reference.table)


def test_above_the_cap_ranks_exchange_only_seed_updates():
    """Global batch 12 over 3 ranks with cap 3: each rank solves its 4 items as pieces of 2; what crosses
    ranks is [index, slot, new seed] x 4 + 3 numbers per rank: the gather never sees an image."""
    points = torch.randn(30, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    seen = []

    class Recording(ThreadGather):
        def for_rank(self, rank):
            inner = super().for_rank(rank)
            return lambda tensor: (seen.append((tensor.dtype, tuple(tensor.shape))), inner(tensor))[1]

    couplings = [SeedCoupling("loom", 30, 2, (1, 2, 2), seed=2, rank=r, world_size=3, max_problem=3)
                 for r in range(3)]
    units = rank_units(points, 3, 4, 1, 5, seed=3)
    results = run_ranks(couplings, units, Recording(3))
    assert set(seen) == {(torch.int64, (15,))}
    assert results[0][0][0].stats.swaps == results[2][0][0].stats.swaps, "global stats on every rank"
    for other in couplings[1:]:
        assert torch.equal(other.table, couplings[0].table)
    # a rank whose generator went astray is caught, not silently diverged
    couplings[1].generator.manual_seed(99)
    with pytest.raises(RuntimeError, match="generators diverged"):
        run_ranks(couplings, units, ThreadGather(3))


def test_batches_that_do_not_fit_the_cap_are_not_joined():
    coupling = SeedCoupling("loom", 20, 1, (1, 1, 1), max_problem=7)
    batches = [(torch.randn(4, 1, 1, 1), torch.arange(4)), (torch.randn(4, 1, 1, 1), torch.arange(4, 8))]
    with pytest.raises(ValueError, match="coupling.max_problem=7"):
        coupling.plan(batches)
    assert coupling.span(4) == 1 and SeedCoupling("loom", 20, 1, (1, 1, 1), max_problem=9).span(4) == 2
    assert SeedCoupling("fixed", 20, 1, (1, 1, 1), max_problem=9).span(4) == 1, "nothing to solve"
    assert SeedCoupling("minibatch_ot", 20, 1, (1, 1, 1), max_problem=9).span(4) == 1, "OT-CFM: the minibatch"


def test_loom_pairs_each_item_with_its_reassigned_noise():
    torch.manual_seed(0)
    points = torch.randn(64, 1, 4, 4)
    coupling = SeedCoupling("loom", 64, 2, (1, 4, 4), seed=1)
    index = torch.arange(32)
    before = coupling.table.clone()
    x0, st_ = coupling.couple(points[index], index)
    assert st_.cost_after <= st_.cost_before and st_.swaps > 0
    changed = (coupling.table != before).any(dim=1)
    assert not changed[32:].any(), "points outside the batch keep their seeds"
    # the noise an item is trained with is exactly the noise of a seed now stored in its row
    for i in range(32):
        candidates = noise_from_seeds(coupling.table[i], (1, 4, 4))
        assert any(torch.equal(x0[i], c) for c in candidates)
    per_item = (points[index] - x0).flatten(1).norm(dim=1).mean().item()
    assert per_item == pytest.approx(st_.cost_after, rel=1e-5)


def test_minibatch_ot_is_optimal_but_forgets():
    torch.manual_seed(0)
    points = torch.randn(16, 3, 2, 2)
    coupling = SeedCoupling("minibatch_ot", 16, 1, (3, 2, 2), seed=3)
    x0, st_ = coupling.couple(points, torch.arange(16))
    assert coupling.table is None
    costs = cost_matrix(points, x0).double().numpy()
    assert np.trace(costs) / 16 == pytest.approx(st_.cost_after, rel=1e-6)
    # optimal: no single transposition improves it
    for i in range(16):
        for j in range(16):
            assert costs[i, i] + costs[j, j] <= costs[i, j] + costs[j, i] + 1e-5


@pytest.mark.parametrize("kind", ["independent", "fixed"])
def test_no_reassignment_kinds(kind):
    points = torch.randn(10, 1, 2, 2)
    coupling = SeedCoupling(kind, 10, 2, (1, 2, 2), seed=0)
    table = None if coupling.table is None else coupling.table.clone()
    x0a, st_ = coupling.couple(points[:5], torch.arange(5))
    assert st_.swaps == 0 and st_.cost_before == st_.cost_after
    if kind == "fixed":
        assert torch.equal(coupling.table, table)
        seen = set()
        for _ in range(40):
            x0, _ = coupling.couple(points[:1], torch.arange(1))
            seen.add(tuple(x0.flatten().tolist()))
        assert len(seen) == 2, "a fixed point only ever sees its own K noises"


def test_independent_noise_differs_across_ranks():
    points = torch.randn(4, 1, 2, 2)
    rank0 = SeedCoupling("independent", 8, 1, (1, 2, 2), seed=5, rank=0, world_size=2)
    rank1 = SeedCoupling("independent", 8, 1, (1, 2, 2), seed=5, rank=1, world_size=2)
    a, _ = rank0.couple(points, torch.arange(4))
    b, _ = rank1.couple(points, torch.arange(4, 8))
    assert not torch.equal(a, b)


def test_repeated_point_in_a_loom_batch_is_refused():
    coupling = SeedCoupling("loom", 4, 1, (1, 1, 1))
    with pytest.raises(ValueError, match="must not repeat"):
        coupling.couple(torch.randn(2, 1, 1, 1), torch.tensor([1, 1]))


def test_state_dict_round_trip_continues_identically():
    points = torch.randn(20, 1, 2, 2)
    a = SeedCoupling("loom", 20, 3, (1, 2, 2), seed=9)
    a.couple(points[:8], torch.arange(8))
    b = SeedCoupling("loom", 20, 3, (1, 2, 2), seed=0)
    b.load_state_dict(a.state_dict())
    xa, _ = a.couple(points[8:16], torch.arange(8, 16))
    xb, _ = b.couple(points[8:16], torch.arange(8, 16))
    assert torch.equal(xa, xb) and torch.equal(a.table, b.table)
    with pytest.raises(ValueError, match="num_points, num_seeds"):
        SeedCoupling("loom", 21, 3, (1, 2, 2)).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="'loom' coupling"):
        SeedCoupling("fixed", 20, 3, (1, 2, 2)).load_state_dict(a.state_dict())


def test_pairs_coupling_uses_the_dataset_noise():
    seeds = torch.tensor([7, 8, 9, 10])
    x1 = torch.randn(2, 1, 2, 2)
    out, st_ = make_coupling("pairs", 4, 1, (1, 2, 2), pair_seeds=seeds).couple(x1, torch.tensor([3, 1]))
    assert torch.equal(out, noise_from_seeds(torch.tensor([10, 8]), (1, 2, 2))) and st_.swaps == 0
    with pytest.raises(ValueError, match="loomcfm pairs"):
        make_coupling("pairs", 4, 1, (1, 2, 2))
    with pytest.raises(ValueError, match="coupling.kind=pairs"):
        make_coupling("loom", 4, 1, (1, 2, 2), pair_seeds=seeds)


def test_pairs_coupling_serves_stored_noise_as_given():
    stored = torch.randn(4, 1, 2, 2)
    x1 = torch.randn(2, 1, 2, 2)
    out, st_ = make_coupling("pairs", 4, 1, (1, 2, 2), pair_noise=lambda index: stored[index]).couple(
        x1, torch.tensor([3, 1]))
    assert torch.equal(out, stored[[3, 1]]) and st_.swaps == 0
    assert st_.cost_before == pytest.approx((x1 - stored[[3, 1]]).flatten(1).norm(dim=1).mean().item())
    with pytest.raises(ValueError, match="coupling.kind=pairs"):
        make_coupling("independent", 4, 1, (1, 2, 2), pair_noise=lambda index: stored[index])


# ---- noise from seeds ------------------------------------------------------------------------------------

def test_same_seed_same_noise_and_batch_independent():
    seeds = torch.tensor([1, 2, 3, -5, 2**62])
    a = noise_from_seeds(seeds, (3, 4, 4))
    assert torch.equal(a, noise_from_seeds(seeds, (3, 4, 4)))
    assert torch.equal(a[1:3], noise_from_seeds(seeds[1:3], (3, 4, 4))), "noise must not depend on the batch"
    assert not torch.equal(a[0], a[1])
    odd = noise_from_seeds(seeds, (1, 3, 3))  # odd element count
    assert odd.shape == (5, 1, 3, 3) and torch.isfinite(odd).all()


def test_noise_is_standard_normal():
    x = noise_from_seeds(random_seeds(2000, torch.Generator().manual_seed(0)), (3, 16, 16)).flatten().double()
    n = len(x)
    assert abs(x.mean().item()) < 5 / n**0.5
    assert abs(x.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert abs(((x - x.mean()) ** 3).mean().item()) < 5 * (6 / n) ** 0.5
    assert abs(((x - x.mean()) ** 4).mean().item() - 3) < 5 * (96 / n) ** 0.5
    sample = x[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:20000]].numpy()
    assert stats.kstest(sample, "norm").pvalue > 1e-3
    assert stats.normaltest(sample).pvalue > 1e-3


def test_noise_has_no_correlation_across_positions_or_seeds():
    x = noise_from_seeds(torch.arange(4000), (2, 4, 4)).flatten(1)  # consecutive seeds: the hard case
    corr = torch.corrcoef(x.T)
    off_diagonal = corr - torch.eye(len(corr))
    assert off_diagonal.abs().max() < 0.1
    across = torch.corrcoef(torch.stack([x[:-1].flatten(), x[1:].flatten()]))[0, 1]
    assert abs(across) < 0.02
