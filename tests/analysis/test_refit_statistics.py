"""Refit statistics: Grams of the dense model's own text, and held-out errors that match the
prune-time refit (`prunenet.core.refit`) without a pass over token rows."""

from __future__ import annotations

import pytest
import torch

from prunenet.analysis import refit_statistics
from prunenet.analysis.refit_statistics import (
    RefitStatistics,
    collect_refit_statistics,
    refit_text,
)
from prunenet.analysis.selfgen import SelfGenConfig, own_text
from prunenet.analysis.sequential import ANALYSIS_SELFGEN
from prunenet.core.arch import adapter_for, decoder_layers, ffn_modules
from prunenet.core.refit import output_error, refit_output
from prunenet.io.cache import entry_path
from tests.conftest import FFN_WIDTH, tiny_model

TEXT = SelfGenConfig(sequences=8, length=16, seed=0)  # 2 sequences (32 rows) held out


def dense_activations(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's FFN output-projection inputs on `tokens`, rows in sequence order."""
    adapter = adapter_for(model.config)
    captured = []
    handles = [
        ffn_modules(layer, adapter)[1].register_forward_pre_hook(
            lambda module, inputs: captured.append(inputs[0].reshape(-1, inputs[0].shape[-1]))
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


def random_statistics(intercept: bool, bias: bool, seed: int = 0):
    """RefitStatistics of random activations (some neurons nearly collinear), and the raw
    (weight, bias, fit rows, held rows) they summarise."""
    generator = torch.Generator().manual_seed(seed)
    fit = torch.randn(80, 12, generator=generator, dtype=torch.float64) + 0.5
    held = torch.randn(30, 12, generator=generator, dtype=torch.float64) + 0.5
    fit[:, 3] = fit[:, 2] + 0.01 * fit[:, 3]
    held[:, 3] = held[:, 2] + 0.01 * held[:, 3]
    weight = torch.randn(6, 12, generator=generator, dtype=torch.float64)
    dense_bias = torch.randn(6, generator=generator, dtype=torch.float64) if bias else None
    column = torch.zeros(6, 1, dtype=torch.float64) if dense_bias is None else dense_bias[:, None]
    stats = RefitStatistics(
        with_ones(fit).T @ with_ones(fit),
        with_ones(held).T @ with_ones(held),
        torch.cat([weight, column], dim=1),
        intercept,
    )
    return stats, (weight, dense_bias, fit, held)


@pytest.mark.parametrize(("intercept", "bias"), [(True, False), (True, True), (False, True)])
def test_held_error_equals_the_refit_outputs_held_out_error_over_the_dense_energy(
    intercept: bool, bias: bool
) -> None:
    stats, (weight, dense_bias, fit, held) = random_statistics(intercept, bias)
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    result = refit_output(weight, dense_bias, keep, fit, held=None, intercept=intercept)
    error = output_error(weight, dense_bias, keep, held, result.weight, result.bias)
    dense = held @ weight.T + (0 if dense_bias is None else dense_bias)
    assert stats.held_error(keep) == pytest.approx(error / float(dense.pow(2).mean()), rel=1e-9)


def test_keeping_every_row_leaves_only_the_ridges_error() -> None:
    stats, _ = random_statistics(intercept=True, bias=False)
    everything = torch.arange(12)
    assert 0 < stats.held_error(everything) < 1e-2
    stats.ridge = 0.0
    assert stats.held_error(everything) == pytest.approx(0.0, abs=1e-12)


def test_the_grams_are_those_of_the_dense_models_fit_and_held_out_rows() -> None:
    model = tiny_model("llama")
    stats = collect_refit_statistics(model, TEXT)
    tokens = own_text(model, TEXT)
    held_rows = 2 * tokens.shape[1]
    for layer, acts in zip(stats, dense_activations(model, tokens), strict=True):
        fit, held = with_ones(acts[:-held_rows]), with_ones(acts[-held_rows:])
        assert layer.fit_gram.dtype == torch.float64
        assert layer.fit_gram.shape == (FFN_WIDTH + 1, FFN_WIDTH + 1)
        assert torch.allclose(layer.fit_gram, fit.T @ fit, rtol=1e-5, atol=1e-5)
        assert torch.allclose(layer.held_gram, held.T @ held, rtol=1e-5, atol=1e-5)
        assert layer.intercept  # Llama stores an output bias once the refit switches it on


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
    settings = {**TEXT.__dict__, "held_out_sequences": 2}
    assert entry_path("refit-grams", model, settings).is_file()

    def no_recompute(*args):
        raise AssertionError("recomputed a cached entry")

    monkeypatch.setattr(refit_statistics, "_collect_grams", no_recompute)
    again = collect_refit_statistics(model, TEXT)
    assert all(torch.equal(a.fit_gram, b.fit_gram) for a, b in zip(first, again, strict=True))


def test_the_default_text_is_the_prune_time_refits_with_the_given_seed() -> None:
    assert refit_text() == ANALYSIS_SELFGEN
    assert refit_text(3) == SelfGenConfig(sequences=64, length=128, seed=3)
