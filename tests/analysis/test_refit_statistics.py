"""Refit statistics: Grams of the dense model's own text, and held-out errors that match the
prune-time refit (`prunenet.core.refit`) without a pass over token rows."""

from __future__ import annotations

import pytest
import torch

from prunenet.analysis import refit_statistics
from prunenet.analysis.refit_statistics import (
    RefitStatistics,
    choose_ridge,
    collect_refit_statistics,
    reference_keep,
    refit_text,
)
from prunenet.analysis.selfgen import SelfGenConfig, own_text
from prunenet.analysis.sequential import ANALYSIS_SELFGEN
from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.refit import (
    DEFAULT_RIDGE,
    RIDGE_CANDIDATES,
    _RidgeSystem,
    output_error,
    refit_output,
)
from prunenet.core.refit import (
    Moments as _Moments,
)
from prunenet.core.surgery import ffn_modules
from prunenet.io.cache import entry_path
from tests.conftest import FFN_WIDTH, tiny_model

TEXT = SelfGenConfig(sequences=8, length=16, seed=0)  # 2 sequences (32 rows) held out
KEEP = torch.tensor([0, 2, 3, 5, 7, 8, 11])


def dense_activations(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's FFN output-projection inputs on `tokens` (sequences x length x d_ff)."""
    adapter = adapter_for(model.config)
    captured = []
    handles = [
        ffn_modules(layer, adapter)[1].register_forward_pre_hook(
            lambda module, inputs: captured.append(inputs[0])
        )
        for layer in decoder_layers(model)
    ]
    with torch.no_grad():
        model(tokens, use_cache=False)
    for handle in handles:
        handle.remove()
    return [acts.double() for acts in captured]


def with_ones(acts: torch.Tensor) -> torch.Tensor:
    return torch.cat([acts, torch.ones(acts.shape[0], 1, dtype=acts.dtype)], dim=1)


def random_statistics(intercept: bool, bias: bool, anchored: bool, seed: int = 0):
    """RefitStatistics of random activations (two neurons nearly collinear, and a massive start
    row when `anchored`), and the raw (weight, bias, fit rows, held rows, anchor row)."""
    generator = torch.Generator().manual_seed(seed)
    fit = torch.randn(80, 12, generator=generator, dtype=torch.float64) + 0.5
    held = torch.randn(30, 12, generator=generator, dtype=torch.float64) + 0.5
    fit[:, 3] = fit[:, 2] + 0.01 * fit[:, 3]
    held[:, 3] = held[:, 2] + 0.01 * held[:, 3]
    anchor = 50 * torch.randn(12, generator=generator, dtype=torch.float64) if anchored else None
    weight = torch.randn(6, 12, generator=generator, dtype=torch.float64)
    dense_bias = torch.randn(6, generator=generator, dtype=torch.float64) if bias else None
    column = torch.zeros(6, 1, dtype=torch.float64) if dense_bias is None else dense_bias[:, None]
    stats = RefitStatistics(
        with_ones(fit).T @ with_ones(fit),
        with_ones(held).T @ with_ones(held),
        torch.cat([weight, column], dim=1),
        intercept,
        anchor,
    )
    return stats, (weight, dense_bias, fit, held, anchor)


def refit_output_error(weight, bias, keep, fit, held, anchor, intercept) -> float:
    """The prune-time refit's held-out error / mean squared dense held output (DEFAULT_RIDGE)."""
    pinned = None
    if anchor is not None:
        pinned = (anchor, anchor @ weight.T + (0 if bias is None else bias))
    result = refit_output(weight, bias, keep, fit, held=None, intercept=intercept, anchor=pinned)
    error = output_error(weight, bias, keep, held, result.weight, result.bias)
    dense = held @ weight.T + (0 if bias is None else bias)
    return error / float(dense.pow(2).mean())


@pytest.mark.parametrize("anchored", [False, True])
@pytest.mark.parametrize(("intercept", "bias"), [(True, False), (True, True), (False, True)])
def test_held_error_equals_the_refit_outputs_held_out_error_over_the_dense_energy(
    intercept: bool, bias: bool, anchored: bool
) -> None:
    stats, (weight, dense_bias, fit, held, anchor) = random_statistics(intercept, bias, anchored)
    expected = refit_output_error(weight, dense_bias, KEEP, fit, held, anchor, intercept)
    assert stats.held_error(KEEP) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("anchored", [False, True])
@pytest.mark.parametrize("intercept", [True, False])
def test_the_rewards_refit_is_the_cuts_ridge_solution_on_the_same_moments(
    intercept: bool, anchored: bool
) -> None:
    stats, (weight, _, _, _, anchor) = random_statistics(intercept, True, anchored)
    stats.ridge = 0.3
    pinned = None
    if anchored:
        pinned = (anchor[KEEP][None], (stats.output[:, :12] @ anchor + stats.output[:, 12])[None])
    moments = _Moments.of_gram(stats.fit_gram, stats.fit_cross, KEEP)
    expected = _RidgeSystem.of(moments, intercept, pinned).solution(stats.ridge)
    coefficients, bias = stats.solution(KEEP)
    torch.testing.assert_close(coefficients.T, expected[0], rtol=1e-8, atol=1e-9)
    if intercept:
        torch.testing.assert_close(bias, expected[1], rtol=1e-8, atol=1e-9)
    else:
        assert bias is None


def test_keeping_every_row_leaves_only_the_ridges_error() -> None:
    stats, _ = random_statistics(intercept=True, bias=False, anchored=False)
    everything = torch.arange(12)
    assert 0 < stats.held_error(everything) < 1e-2
    stats.ridge = 0.0
    assert stats.held_error(everything) == pytest.approx(0.0, abs=1e-12)


def test_choose_ridge_picks_the_candidate_with_the_smallest_held_out_error() -> None:
    stats, _ = random_statistics(intercept=True, bias=False, anchored=True)
    errors = {}
    for ridge in RIDGE_CANDIDATES:
        stats.ridge = ridge
        errors[ridge] = stats.held_error(KEEP)
    assert choose_ridge(stats, KEEP) == min(errors, key=errors.__getitem__) == stats.ridge


def test_the_reference_keep_set_is_the_rows_with_the_most_output_energy() -> None:
    stats, (weight, _, fit, _, _) = random_statistics(intercept=True, bias=False, anchored=False)
    energy = fit.pow(2).mean(0).sqrt() * weight.norm(dim=0)
    expected = torch.argsort(energy, descending=True)[: round(0.7 * 12)].sort().values
    assert torch.equal(reference_keep(stats), expected)


def test_the_grams_are_the_dense_models_fit_and_held_rows_without_the_start_token() -> None:
    model = tiny_model("llama")
    stats = collect_refit_statistics(model, TEXT)
    for layer, acts in zip(stats, dense_activations(model, own_text(model, TEXT)), strict=True):
        assert torch.allclose(acts[:, 0], acts[:1, 0].expand_as(acts[:, 0]))  # one start row
        rows = acts[:, 1:]
        fit, held = (
            with_ones(rows[:-2].reshape(-1, FFN_WIDTH)),
            with_ones(rows[-2:].reshape(-1, FFN_WIDTH)),
        )
        assert layer.fit_gram.dtype == torch.float64
        assert layer.fit_gram.shape == (FFN_WIDTH + 1, FFN_WIDTH + 1)
        assert torch.allclose(layer.fit_gram, fit.T @ fit, rtol=1e-5, atol=1e-5)
        assert torch.allclose(layer.held_gram, held.T @ held, rtol=1e-5, atol=1e-5)
        assert torch.allclose(layer.anchor, acts[0, 0], rtol=1e-6, atol=1e-6)
        assert layer.intercept  # Llama stores an output bias once the refit switches it on
        assert layer.ridge in RIDGE_CANDIDATES


def test_a_fixed_ridge_is_used_as_given() -> None:
    stats = collect_refit_statistics(tiny_model("llama"), TEXT, ridge=DEFAULT_RIDGE)
    assert {layer.ridge for layer in stats} == {DEFAULT_RIDGE}


def test_collecting_a_few_sequences_at_a_time_changes_nothing(monkeypatch) -> None:
    model = tiny_model("llama")
    whole = collect_refit_statistics(model, TEXT)
    monkeypatch.setattr(refit_statistics, "CHUNK_SEQUENCES", 3)  # chunks straddle nothing
    monkeypatch.setenv("PRUNENET_NO_CACHE", "1")
    chunked = collect_refit_statistics(model, TEXT)
    for a, b in zip(whole, chunked, strict=True):
        assert torch.allclose(a.fit_gram, b.fit_gram, rtol=1e-6, atol=1e-6)
        assert torch.allclose(a.held_gram, b.held_gram, rtol=1e-6, atol=1e-6)


def test_the_grams_are_cached_as_one_safetensors_entry(monkeypatch) -> None:
    model = tiny_model("llama")
    first = collect_refit_statistics(model, TEXT)
    settings = {**TEXT.__dict__, "held_out_sequences": 2, "first_token": "anchor"}
    assert entry_path("refit-grams", model, settings).is_file()

    def no_recompute(*args):
        raise AssertionError("recomputed a cached entry")

    monkeypatch.setattr(refit_statistics, "_collect_grams", no_recompute)
    again = collect_refit_statistics(model, TEXT)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.fit_gram, b.fit_gram) and torch.equal(a.anchor, b.anchor)


def test_the_reward_text_stays_64_x_128_when_the_prune_default_moves() -> None:
    # The committed refit-reward table was measured on 64 x 128 tokens.
    assert refit_text() == SelfGenConfig(sequences=64, length=128, seed=0)
    assert refit_text(3) == SelfGenConfig(sequences=64, length=128, seed=3)
    assert refit_text().kept_tokens == ANALYSIS_SELFGEN.kept_tokens
