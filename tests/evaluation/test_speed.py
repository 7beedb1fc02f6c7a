"""Speed: alternated timing of two models of known cost, decode of a fixed length, sizes."""

from __future__ import annotations

import pytest

from prunenet.core.compress import prune_model
from prunenet.core.config_fields import ffn_widths
from prunenet.core.ratios import uniform_keep
from prunenet.evaluation.speed import (
    MODEL,
    REFERENCE,
    compare_runners,
    compare_speed,
    parameter_counts,
)
from prunenet.scoring.registry import make_scorer
from tests.conftest import tiny_model


class FakeClock:
    """A clock that only moves when a fake model runs: costs are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_model(clock: FakeClock, seconds: float, tokens: int, calls: list[str], name: str):
    """A runner that costs `seconds` per call for `tokens` tokens and records that it ran."""

    def run() -> int:
        calls.append(name)
        clock.now += seconds
        return tokens

    return run


def test_models_are_alternated_and_the_order_flips_every_round():
    clock, calls = FakeClock(), []
    dense = fake_model(clock, 2.0, 100, calls, "dense")
    pruned = fake_model(clock, 1.0, 100, calls, "pruned")
    row = compare_runners("prefill", 1, dense, pruned, rounds=5, warmup=1, clock=clock)
    # warm-up: dense, pruned; then AB BA AB BA AB.
    assert calls == ["dense", "pruned"] + ["dense", "pruned", "pruned", "dense"] * 2 + [
        "dense",
        "pruned",
    ]
    timed = [label for phase, label in row.call_order if phase == "timed"]
    assert timed[:4] == [REFERENCE, MODEL, MODEL, REFERENCE]


def test_speedup_is_the_ratio_of_known_costs():
    clock, calls = FakeClock(), []
    dense = fake_model(clock, 2.0, 100, calls, "dense")
    pruned = fake_model(clock, 1.0, 100, calls, "pruned")
    row = compare_runners("decode", 8, dense, pruned, rounds=5, clock=clock)
    assert (row.reference.median, row.model.median) == (50.0, 100.0)
    assert row.speedup == pytest.approx(2.0)
    assert row.paired_speedup == pytest.approx(2.0)
    assert len(row.model.samples) == len(row.reference.samples) == 5


def test_without_a_reference_only_the_model_is_timed_and_there_is_no_speedup():
    clock, calls = FakeClock(), []
    model = fake_model(clock, 0.5, 10, calls, "model")
    row = compare_runners("prefill", 1, None, model, rounds=3, warmup=1, clock=clock)
    assert calls == ["model"] * 4
    assert (row.reference, row.speedup, row.model.median) == (None, None, 20.0)


def test_compare_speed_on_real_models_measures_prefill_and_fixed_length_decode():
    dense = tiny_model("llama")
    speed = compare_speed(dense, dense, prefill_tokens=8, max_new_tokens=3, rounds=2)
    assert [(r.measurement, r.batch_size) for r in speed.rows] == [
        ("prefill", 1),
        ("decode", 1),
        ("decode", 8),
    ]
    assert [r.tokens_per_call for r in speed.rows] == [8, 3, 24]
    assert speed.threads == 1 and speed.device.startswith("cpu")


def test_parameter_counts_find_every_ffn_and_shrink_with_pruning():
    model = tiny_model("llama")
    counts = parameter_counts(model)
    # 2 layers x (gate + up + down) x hidden 16 x d_ff 24, no biases.
    assert counts.ffn == 2 * 3 * 16 * 24
    assert counts.ffn_widths == [24, 24]
    scores = make_scorer("magnitude").score_model(model)
    prune_model(model, scores, uniform_keep(ffn_widths(model.config), 0.5))
    pruned = parameter_counts(model)
    assert pruned.ffn == counts.ffn // 2
    assert pruned.total == counts.total - counts.ffn // 2


def test_parameter_counts_handle_conv1d_layout():
    assert parameter_counts(tiny_model("gpt2")).ffn_widths == [64, 64]  # d_ff = 4 x hidden
