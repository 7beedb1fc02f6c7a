"""Per-layer damage curves measured on self-generated text; the auto allocation built on them."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from prunenet.allocation.budget import CostGrid
from prunenet.allocation.sensitivity import (
    SENSITIVITY_RATIOS,
    auto_allocation,
    layer_sensitivity,
)
from prunenet.core.arch import decoder_layers
from prunenet.core.config_fields import ffn_widths
from prunenet.core.ratios import rows_for_ratio
from prunenet.errors import PruneNetError
from prunenet.scoring.heuristics import MagnitudeScorer, RandomScorer
from tests.conftest import SMALL_SELFGEN as SMALL
from tests.conftest import tiny_model

RATIOS = (0.15, 0.3, 0.45, 0.6)


pytestmark = pytest.mark.usefixtures("no_disk_cache")


def _curves(model_type: str = "llama", **overrides) -> list[CostGrid]:
    model = tiny_model(model_type, **overrides)
    scores = MagnitudeScorer().score_model(model)
    return layer_sensitivity(model, scores, RATIOS, SMALL, progress=False)


def test_layer_sensitivity_returns_one_cost_grid_per_layer_on_the_given_ratios() -> None:
    model = tiny_model("llama")
    curves = layer_sensitivity(
        model, MagnitudeScorer().score_model(model), RATIOS, SMALL, progress=False
    )
    assert len(curves) == len(decoder_layers(model))
    assert all(isinstance(c, CostGrid) and tuple(c.ratios) == RATIOS for c in curves)


def test_layer_sensitivity_costs_are_non_negative_and_mostly_increase_with_ratio() -> None:
    curves = _curves("llama", num_hidden_layers=4)
    steps = [float(step) for curve in curves for step in np.diff(curve.costs)]
    assert all(cost >= 0 for curve in curves for cost in curve.costs)
    assert all(curve.costs[-1] > curve.costs[0] for curve in curves)
    assert sum(step > 0 for step in steps) >= 0.75 * len(steps)


def test_layer_sensitivity_measures_the_rows_the_scores_choose() -> None:
    """Different scores give different curves: a curve belongs to the scorer that will prune."""
    model = tiny_model("llama")
    magnitude = layer_sensitivity(
        model, MagnitudeScorer().score_model(model), RATIOS, SMALL, progress=False
    )
    random = layer_sensitivity(
        model, RandomScorer(3).score_model(model), RATIOS, SMALL, progress=False
    )
    assert [c.costs for c in magnitude] != [c.costs for c in random]


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.4])
def test_auto_allocation_meets_the_exact_global_row_budget(ratio: float) -> None:
    model = tiny_model("llama", num_hidden_layers=3)
    removed = auto_allocation(model, MagnitudeScorer(), ratio)
    widths = ffn_widths(model.config)
    assert sum(removed) == rows_for_ratio(widths, ratio)
    assert len(removed) == len(widths)


def test_auto_allocation_respects_max_layer_ratio() -> None:
    model = tiny_model("llama", num_hidden_layers=3)
    widths = ffn_widths(model.config)
    removed = auto_allocation(model, MagnitudeScorer(), 0.3, max_layer_ratio=0.45)
    assert sum(removed) == rows_for_ratio(widths, 0.3)
    assert all(k <= math.floor(0.45 * w + 1e-9) for k, w in zip(removed, widths, strict=True))


def test_auto_allocation_refuses_a_max_layer_ratio_above_the_measured_grid() -> None:
    model = tiny_model("llama")
    with pytest.raises(PruneNetError, match="exceeds the largest measured layer ratio"):
        auto_allocation(model, MagnitudeScorer(), 0.3, max_layer_ratio=SENSITIVITY_RATIOS[-1] + 0.1)


def test_auto_allocation_refuses_a_budget_the_caps_cannot_hold() -> None:
    model = tiny_model("llama")
    with pytest.raises(PruneNetError, match="caps"):
        auto_allocation(model, MagnitudeScorer(), 0.5, max_layer_ratio=0.3)


def test_layer_sensitivity_leaves_the_model_unchanged() -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer_sensitivity(model, MagnitudeScorer().score_model(model), RATIOS, SMALL, progress=False)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model("llama")(ids).logits)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_auto_on_the_runs_text_writes_no_text_and_reads_its_held_out_part(monkeypatch) -> None:
    import prunenet.allocation.sensitivity as sensitivity
    import prunenet.analysis.selfgen as selfgen
    from prunenet.allocation.strategy import held_out_sequences, strategy_tokens
    from prunenet.scoring.heuristics import SelfGenScorer

    model = tiny_model("llama")
    tokens = selfgen.generate_own_text(model, SMALL)
    written, measured_on = [], []
    monkeypatch.setattr(selfgen, "generate_own_text", lambda *a, **k: written.append(1))
    monkeypatch.setattr(sensitivity, "generate_own_text", lambda *a, **k: written.append(1))
    curves = sensitivity.layer_sensitivity

    def spy(model, scores, *args, tokens=None, activations=None, **kwargs):
        measured_on.append((tokens, activations))
        return curves(model, scores, *args, tokens=tokens, activations=activations, **kwargs)

    monkeypatch.setattr(sensitivity, "layer_sensitivity", spy)
    removed = auto_allocation(model, SelfGenScorer(), 0.3, tokens=tokens)
    widths = ffn_widths(model.config)
    assert sum(removed) == rows_for_ratio(widths, 0.3)
    assert written == []
    sample = strategy_tokens(tokens)
    kl_tokens, activations = measured_on[0]
    assert torch.equal(kl_tokens, sample[-held_out_sequences(sample.shape[0]) :])
    assert len(activations) == len(widths)


def test_auto_scores_the_runs_text_with_an_activation_scorer() -> None:
    """An activation scorer ranks rows on the run's text: another text, other curves."""
    import prunenet.analysis.selfgen as selfgen
    from prunenet.allocation.sensitivity import run_text_sensitivity
    from prunenet.scoring.heuristics import SelfGenScorer

    model = tiny_model("llama")
    one = selfgen.generate_own_text(model, SMALL)
    other = selfgen.generate_own_text(model, dataclasses.replace(SMALL, seed=1))
    first = run_text_sensitivity(model, SelfGenScorer(), one, progress=False)
    again = run_text_sensitivity(model, SelfGenScorer(), one, progress=False)
    second = run_text_sensitivity(model, SelfGenScorer(), other, progress=False)
    assert [c.costs for c in first] == [c.costs for c in again]
    assert [c.costs for c in first] != [c.costs for c in second]
