"""One assignment problem: exact solvers agree, only improving cycles are kept, one transfer to the host."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from loomcfm_core.choices import ASSIGNMENT_SOLVERS
from loomcfm_core.coupling_solve import (assign, cost_matrix, cycle_labels, keep_improving_cycles, pair_costs, solve,
                                         to_host)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 200])
def test_solvers_find_the_optimum(n):
    costs = np.random.default_rng(n).random((n, n))
    rows, cols = linear_sum_assignment(costs)
    for solver in ASSIGNMENT_SOLVERS:
        perm = solve(costs, solver)
        assert sorted(perm.tolist()) == list(range(n)), "a permutation"
        assert costs[np.arange(n), perm].sum() == pytest.approx(costs[rows, cols].sum(), rel=1e-12)
    with pytest.raises(ValueError, match="coupling.solver"):
        solve(costs, "hungarian")


@settings(max_examples=50, deadline=None)
@given(st.permutations(list(range(12))))
def test_cycle_labels_name_each_cycle_by_its_smallest_member(perm):
    perm = np.array(perm)
    labels = cycle_labels(perm)
    for i in range(len(perm)):
        cycle, j = {i}, perm[i]
        while j != i:
            cycle.add(j)
            j = perm[j]
        assert labels[i] == min(cycle)


def test_only_cycles_that_lower_the_cost_are_kept():
    perm = np.array([1, 0, 3, 4, 2, 5])           # cycles (0 1), (2 3 4), (5)
    delta = np.array([-1.0, 0.5, 1.0, -0.5, -0.4, 0.0])
    assert keep_improving_cycles(perm, delta).tolist() == [1, 0, 2, 3, 4, 5]
    assert keep_improving_cycles(perm, np.zeros(6)).tolist() == list(range(6)), "a tie keeps the current pairs"


def test_assign_never_raises_the_float64_cost_and_is_optimal():
    gen = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(64, 3, 4, 4, generator=gen), torch.randn(64, 3, 4, 4, generator=gen)
    solved = assign(x1, x0, "l2", "lapjv")
    assert solved.after.sum() < solved.before.sum() and solved.swaps > 0
    np.testing.assert_allclose(solved.after, pair_costs(x1, x0[torch.from_numpy(solved.perm)]).numpy(), rtol=1e-6)
    exact = cost_matrix(x1, x0).double().numpy()
    rows, cols = linear_sum_assignment(exact)
    assert solved.after.sum() == pytest.approx(exact[rows, cols].sum(), rel=1e-6)
    # the same points twice: every reassignment is a tie, none is made
    tied = assign(x1, x1.clone(), "sqeuclidean", "scipy")
    assert tied.swaps == 0 and (tied.before == tied.after).all()


def test_to_host_leaves_cpu_tensors_alone():
    a, b = torch.ones(3, 2), torch.zeros(3, 4, 5)
    out = to_host(a, b)
    assert out[0] is a and out[1] is b
