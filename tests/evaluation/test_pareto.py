"""Pareto flags: dominated points are off the front, ties and missing values handled."""

from __future__ import annotations

import math

import pytest

from prunenet.errors import PruneNetError
from prunenet.evaluation.pareto import non_dominated


def test_a_point_worse_on_every_objective_is_off_the_front() -> None:
    # (params, perplexity): the third is bigger and worse than the first.
    assert non_dominated([(10, 5.0), (8, 6.0), (11, 5.5)], ["min", "min"]) == [True, True, False]


def test_max_objectives_count_higher_as_better() -> None:
    # (perplexity, speed-up): the second is as good on quality and faster.
    assert non_dominated([(5.0, 1.1), (5.0, 1.3)], ["min", "max"]) == [False, True]


def test_identical_points_are_both_on_the_front() -> None:
    assert non_dominated([(1, 2), (1, 2)], ["min", "min"]) == [True, True]


def test_a_missing_value_takes_a_point_off_the_front_without_dominating() -> None:
    flags = non_dominated([(1, None), (2, 3.0), (0, math.nan)], ["min", "min"])
    assert flags == [False, True, False]


def test_bad_directions_and_ragged_points_are_refused() -> None:
    with pytest.raises(PruneNetError):
        non_dominated([(1, 2)], ["min", "lower"])
    with pytest.raises(PruneNetError):
        non_dominated([(1, 2, 3)], ["min", "min"])
