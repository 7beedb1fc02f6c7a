"""The checks of declared sizes and tensors every policy loader runs before it builds a network."""

from __future__ import annotations

import pytest
import torch

from prunenet.rl.checks import count_problem, listed, tensor_problem


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (8, None),
        (4096, None),
        (4097, "width=4097, which is not a whole number from 1 to 4,096"),
        (0, "width=0, which"),
        (-5, "width=-5, which"),
        (True, "width=True, which"),
        (8.0, "width=8.0, which"),
        ("8", "width='8', which"),
        (None, "no width (missing or null"),
    ],
)
def test_count_problem_accepts_only_json_integers_in_range(value, problem) -> None:
    found = count_problem("width", value, 4096)
    assert found == problem if problem is None else found.startswith(problem)


def test_count_problem_quotes_a_long_value_only_in_part() -> None:
    assert len(count_problem("width", "9" * 10_000 + "x", 4096)) < 120


SHAPES = {"a.weight": (2, 3), "a.bias": (2,)}


def _state(**changes) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.ones(2, 3), "a.bias": torch.ones(2), **changes}


def test_tensor_problem_accepts_the_declared_tensors() -> None:
    assert tensor_problem(_state(), SHAPES, "net") is None


@pytest.mark.parametrize(
    ("state", "problem"),
    [
        ({"a.weight": torch.ones(2, 3)}, "its weights are not those of net (missing a.bias)"),
        (_state(b=torch.ones(1)), "its weights are not those of net (unexpected b)"),
        (_state(**{"a.bias": torch.ones(3)}), "do not match net: a.bias is (3,), expected (2,)"),
        (_state(**{"a.bias": torch.ones(2, dtype=torch.int32)}), "a.bias are not floating-point"),
        (_state(**{"a.bias": torch.tensor([0.0, float("nan")])}), "a.bias hold NaN or infinite"),
        (_state(**{"a.weight": torch.full((2, 3), -float("inf"))}), "a.weight hold NaN or inf"),
    ],
)
def test_tensor_problem_names_what_is_wrong(state, problem: str) -> None:
    assert problem in tensor_problem(state, SHAPES, "net")


def test_listed_names_every_item_of_a_short_list() -> None:
    assert listed([1, 2, 3]) == "1, 2, 3"


def test_listed_names_a_few_items_of_a_long_list_and_counts_the_rest() -> None:
    assert listed(list(range(10_000))) == "0, 1, 2 ... (9997 more)"
