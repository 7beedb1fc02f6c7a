"""The shared analysis: one walk of the dense model, and each request's refit from its moments."""

from __future__ import annotations

import pytest
import torch

from prunenet.analysis.refit_statistics import RefitStatistics
from prunenet.analysis.shared import (
    SharedCut,
    SharedRefit,
    _gram,
    shared_analysis,
    solve_refit,
)
from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.compress import prune_model
from prunenet.core.ratios import uniform_keep
from prunenet.core.refit import DEFAULT_RIDGE, _RidgeSystem, refit_output
from prunenet.core.refit import Moments as _Moments
from prunenet.core.surgery import ffn_weights
from tests.conftest import FFN_WIDTH, logits_of, start_token_text, tiny_model


@pytest.mark.parametrize("intercept", [True, False])
def test_the_refit_from_moments_equals_the_refit_from_rows(intercept: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    acts = torch.randn(200, 12, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    bias = torch.randn(5, generator=generator, dtype=torch.float64) if intercept else None
    anchor = 30 * torch.randn(12, generator=generator, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 5, 8, 9, 11])
    output = torch.cat([weight, (bias if intercept else torch.zeros(5))[:, None]], dim=1)
    statistics = RefitStatistics(_gram(acts), None, output, intercept, anchor, DEFAULT_RIDGE)
    statistics = SharedRefit.of(statistics)
    dense_anchor = anchor @ weight.T + (0 if bias is None else bias)
    expected = refit_output(weight, bias, keep, acts, None, "lsq", intercept=intercept,
                            anchor=(anchor, dense_anchor))  # fmt: skip
    new_weight, new_bias = solve_refit(statistics, keep)
    torch.testing.assert_close(new_weight, expected.weight, rtol=1e-8, atol=1e-9)
    if intercept:
        torch.testing.assert_close(new_bias, expected.bias, rtol=1e-8, atol=1e-9)
    else:
        assert new_bias is None
    # The start token's dense output is reproduced exactly.
    refitted = anchor[keep] @ new_weight.T + (0 if new_bias is None else new_bias)
    torch.testing.assert_close(refitted, dense_anchor, rtol=1e-9, atol=1e-9)


def _layer_statistics(intercept: bool) -> tuple[RefitStatistics, torch.Tensor]:
    """A layer's refit statistics (fit and held-out Grams, a massive start row), a keep set."""
    generator = torch.Generator().manual_seed(1)
    acts = torch.randn(150, 12, generator=generator, dtype=torch.float64).relu()
    output = torch.randn(5, 13, generator=generator, dtype=torch.float64)
    anchor = 30 * torch.randn(12, generator=generator, dtype=torch.float64).relu()
    statistics = RefitStatistics(_gram(acts[:100]), _gram(acts[100:]), output, intercept, anchor)
    return statistics, torch.tensor([1, 2, 4, 5, 7, 10, 11])


@pytest.mark.parametrize("intercept", [True, False])
def test_the_shared_refit_and_the_refit_reward_solve_the_same_statistics_bit_for_bit(
    intercept: bool,
) -> None:
    statistics, keep = _layer_statistics(intercept)
    statistics.ridge = 0.03
    shared = SharedRefit(statistics.fit_gram, statistics.fit_cross, statistics.output,
                         statistics.anchor, intercept, statistics.ridge)  # fmt: skip
    new_weight, new_bias = solve_refit(shared, keep)
    coefficients, reward_bias = statistics.solution(keep)
    assert torch.equal(new_weight, coefficients.T)
    assert (new_bias is None and reward_bias is None) or torch.equal(new_bias, reward_bias)


@pytest.mark.parametrize("intercept", [True, False])
def test_the_shared_refit_is_the_cuts_ridge_solution_on_the_same_moments(intercept: bool) -> None:
    statistics, keep = _layer_statistics(intercept)
    shared = SharedRefit.of(statistics)  # fit and held-out rows, at the default ridge
    output = shared.output
    anchor = (shared.anchor[keep][None], (output[:, :12] @ shared.anchor + output[:, 12])[None])
    moments = _Moments.of_gram(shared.gram, shared.cross, keep)
    expected = _RidgeSystem.of(moments, intercept, anchor).solution(shared.ridge)
    new_weight, new_bias = solve_refit(shared, keep)
    torch.testing.assert_close(new_weight, expected[0], rtol=1e-9, atol=1e-10)
    if intercept:
        torch.testing.assert_close(new_bias, expected[1], rtol=1e-9, atol=1e-10)


def test_the_analysis_leaves_the_dense_model_unchanged() -> None:
    model = tiny_model("llama")
    before = {name: p.clone() for name, p in model.state_dict().items()}
    analysis = shared_analysis(model, start_token_text(8, 12), "lsq")
    assert len(analysis.layers) == len(decoder_layers(model))
    assert all(layer.refit.gram.dtype == torch.float64 for layer in analysis.layers)
    assert analysis.held_out_sequences == 2
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("refit", ["lsq", "bias", "none"])
def test_a_request_cut_from_the_analysis_keeps_the_asked_rows_and_runs(refit: str) -> None:
    model = tiny_model("llama", mlp_bias=refit == "bias")
    analysis = shared_analysis(model, start_token_text(8, 12), refit)
    widths = [FFN_WIDTH] * len(decoder_layers(model))
    adapter = adapter_for(model.config)
    scores = [ffn_weights(layer, adapter).output.norm(dim=0) for layer in decoder_layers(model)]
    cut = SharedCut(model, analysis)
    report = prune_model(model, scores, uniform_keep(widths, 0.25), cut=cut)
    assert report.ffn_widths_after == uniform_keep(widths, 0.25)
    assert torch.isfinite(logits_of(model)).all()
    assert len(cut.log) == len(widths)
