"""Allocating one global FFN budget over layers: exact totals, caps, determinism, cost order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from prunenet.allocation.budget import (
    CostGrid,
    allocate_rows,
    keep_counts,
    rows_for_parameter_target,
    uniform_allocation,
)
from prunenet.core.compress import count_parameters, prune_model
from prunenet.core.config_fields import ffn_width, ffn_widths
from prunenet.core.ratios import rows_for_ratio
from prunenet.errors import PruneNetError
from tests.conftest import tiny_model


def quadratic(scale: float):
    return lambda k: scale * k * k


def convex_curves(widths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.cumsum(np.sort(rng.random(width + 1))) for width in widths]


def test_budget_is_met_exactly_for_every_total():
    widths = [40, 32, 48, 40]
    curves = convex_curves(widths)
    for total in range(0, int(0.6 * sum(widths)) - 2, 7):
        assert sum(allocate_rows(curves, widths, total)) == total


def test_caps_and_floors_are_respected():
    widths = [50, 50, 50, 50]
    # Layer 0 is nearly free to prune: without its cap it would take the whole budget.
    curves = [quadratic(0.001), quadratic(1.0), quadratic(1.0), quadratic(1.0)]
    removed = allocate_rows(curves, widths, 80, max_ratio=0.6, min_ratio=0.1)
    assert sum(removed) == 80
    assert removed[0] == 30  # 60% of 50
    assert all(5 <= k <= 30 for k in removed)


def test_per_layer_caps_can_spare_a_layer():
    removed = allocate_rows([quadratic(1.0)] * 3, [30, 30, 30], 20, max_ratio=[0.0, 0.6, 0.6])
    assert removed == [0, 10, 10]


def test_a_layer_keeps_at_least_one_row_even_with_cap_one():
    removed = allocate_rows([quadratic(1.0)] * 2, [4, 4], 6, max_ratio=1.0)
    assert removed == [3, 3]


def test_allocation_is_deterministic_and_ties_go_to_the_lowest_layer():
    curves = [quadratic(1.0)] * 4
    first = allocate_rows(curves, [20] * 4, 9)
    assert first == allocate_rows(curves, [20] * 4, 9)
    assert first == [3, 2, 2, 2]


def test_a_costlier_layer_loses_fewer_rows():
    removed = allocate_rows([quadratic(2.0), quadratic(1.0)], [100, 100], 60)
    assert removed[0] < removed[1]
    assert removed == [20, 40]  # equal marginal cost: 4 * k0 = 2 * k1


def test_greedy_matches_brute_force_on_convex_curves():
    widths = [6, 5, 7]
    curves = convex_curves(widths, seed=3)
    for total in range(0, 10):
        removed = allocate_rows(curves, widths, total, max_ratio=0.6)
        caps = [int(0.6 * w) for w in widths]
        best = min(
            sum(curve[k] for curve, k in zip(curves, combo, strict=True))
            for combo in itertools.product(*(range(cap + 1) for cap in caps))
            if sum(combo) == total
        )
        achieved = sum(curve[k] for curve, k in zip(curves, removed, strict=True))
        assert achieved == pytest.approx(best)


def test_every_curve_form_gives_the_same_allocation():
    widths = [20, 20]
    arrays = [np.arange(13) ** 2 * 1.0, np.arange(13) ** 2 * 3.0]
    grid = [CostGrid([0.0, 0.6], [0.0, 144.0 * s]) for s in (1.0, 3.0)]
    from_arrays = allocate_rows(arrays, widths, 10)
    assert allocate_rows([torch.tensor(a) for a in arrays], widths, 10) == from_arrays
    assert allocate_rows([quadratic(1.0), quadratic(3.0)], widths, 10) == from_arrays
    # Linear curves: the cheaper layer takes rows up to its cap first.
    assert allocate_rows(grid, widths, 15) == [12, 3]


def test_cost_grid_interpolates_and_implies_zero_cost_at_zero():
    table = CostGrid([0.25, 0.5], [1.0, 3.0]).table(width=8, max_rows=4)
    np.testing.assert_allclose(table, [0.0, 0.5, 1.0, 2.0, 3.0])


def test_cost_grid_refuses_to_extrapolate_past_its_last_ratio():
    with pytest.raises(PruneNetError, match="does not extrapolate"):
        allocate_rows([CostGrid([0.1, 0.3], [1.0, 2.0])], [100], 10, max_ratio=0.6)


def test_a_short_cost_array_is_refused():
    with pytest.raises(PruneNetError, match="k = 0..6"):
        allocate_rows([np.zeros(3)], [10], 2)


def test_uniform_allocation_spreads_the_remainder_over_the_first_layers():
    assert uniform_allocation([10, 10, 10], 7) == [3, 2, 2]
    assert uniform_allocation([100, 200, 100], 100) == [25, 50, 25]


def test_uniform_allocation_equals_the_allocator_with_identical_curves():
    widths = [24] * 5
    for total in range(0, 70, 3):
        same = allocate_rows([quadratic(1.0)] * 5, widths, total)
        assert uniform_allocation(widths, total) == same


def test_uniform_allocation_fills_other_layers_when_one_is_capped():
    removed = uniform_allocation([10, 10, 10], 12, max_ratio=[0.2, 0.6, 0.6])
    assert removed == [2, 5, 5]


@pytest.mark.parametrize("allocator", ["greedy", "uniform"])
def test_a_budget_above_the_caps_is_refused_clearly(allocator):
    call = {
        "greedy": lambda: allocate_rows([quadratic(1.0)] * 2, [10, 10], 13),
        "uniform": lambda: uniform_allocation([10, 10], 13),
    }[allocator]
    with pytest.raises(PruneNetError, match=r"at most 12 \(60.0%\)"):
        call()


def test_a_budget_below_the_floors_is_refused_clearly():
    with pytest.raises(PruneNetError, match="floors"):
        allocate_rows([quadratic(1.0)] * 2, [10, 10], 1, min_ratio=0.2)


def test_rows_for_ratio_counts_all_layers():
    assert rows_for_ratio([1536] * 30, 0.3) == 13824
    with pytest.raises(PruneNetError):
        rows_for_ratio([10], 1.0)


def test_parameter_target_converts_to_the_fewest_rows_that_reach_it():
    model = tiny_model("llama")
    per_row = 3 * model.config.hidden_size  # gate row, up row, down column; no biases
    before = count_parameters(model)
    assert rows_for_parameter_target(model, before - 5 * per_row) == 5
    assert rows_for_parameter_target(model, before - 5 * per_row - 1) == 6
    assert rows_for_parameter_target(model, before + 10) == 0


def test_prune_model_with_allocated_keep_counts_removes_the_exact_budget():
    model = tiny_model("llama")
    widths = ffn_widths(model.config)
    total = rows_for_ratio(widths, 0.3)
    removed = allocate_rows([quadratic(2.0), quadratic(1.0)], widths, total)
    scores = [torch.arange(w, dtype=torch.float32) for w in widths]
    report = prune_model(model, scores, keep_counts(widths, removed), target_ratio=0.3)
    assert sum(widths) - sum(report.ffn_widths_after) == total
    assert ffn_widths(model.config) == report.ffn_widths_after


@pytest.mark.parametrize("bad_keep", [[0, 10], [25, 10], [10.5, 10], [10]])
def test_prune_model_refuses_bad_keep_counts_and_leaves_the_model_untouched(bad_keep):
    model = tiny_model("llama")
    width = ffn_width(model.config)
    with pytest.raises(PruneNetError):
        prune_model(model, [torch.rand(width)] * 2, bad_keep, target_ratio=0.3)
    assert ffn_widths(model.config) == [width, width]
