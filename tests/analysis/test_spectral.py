"""Spectra, KS distances, function error and row spectral statistics: checked against direct
computations (torch.linalg.svdvals, scipy.stats.ks_2samp, the unfactored FFN output)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from prunenet.analysis import spectral
from prunenet.analysis.spectral import (
    function_error,
    ks_distance,
    ks_reward,
    output_energy,
    row_spectral_stats,
    singular_values,
    top_eigenpairs,
)


def _random(rows: int, cols: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _with_condition_number(rows: int, cols: int, condition: float, seed: int = 0):
    """A float64 matrix whose singular values fall log-uniformly from 1 to 1 / condition."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))
    spectrum = torch.logspace(0, -float(np.log10(condition)), cols, dtype=torch.float64)
    return left @ torch.diag(spectrum) @ right.T


# ----- singular values --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (20, 20)])
def test_singular_values_equal_svdvals_in_float64_on_a_random_matrix(shape) -> None:
    matrix = _random(*shape)
    expected = torch.linalg.svdvals(matrix)
    assert torch.allclose(singular_values(matrix), expected, rtol=1e-10, atol=1e-12)


def test_singular_values_equal_svdvals_in_float64_on_an_ill_conditioned_matrix() -> None:
    matrix = _with_condition_number(64, 16, condition=1e6)
    expected = torch.linalg.svdvals(matrix)
    assert expected[0] / expected[-1] == pytest.approx(1e6, rel=1e-6)
    # A float32 Gram would be off by tens of percent on the smallest values
    # (docs/architecture.md, "Findings").
    assert torch.allclose(singular_values(matrix), expected, rtol=1e-4, atol=0)


def test_singular_values_of_a_float32_matrix_are_computed_in_float64() -> None:
    matrix = _with_condition_number(64, 16, condition=1e6).float()
    values = singular_values(matrix)
    assert values.dtype == torch.float64
    assert torch.allclose(values, torch.linalg.svdvals(matrix.double()), rtol=1e-4, atol=0)


def test_singular_values_are_sorted_descending_and_non_negative() -> None:
    values = singular_values(_random(30, 10) @ _random(10, 12, seed=1))  # rank 10 of 12
    assert torch.all(values[:-1] >= values[1:])
    assert torch.all(values >= 0)


# ----- KS ----------------------------------------------------------------------------------------


def test_ks_distance_agrees_with_scipy_on_a_known_case() -> None:
    original = torch.tensor([1.0, 2.0, 3.0, 4.0])
    pruned = torch.tensor([3.0, 4.0, 5.0, 6.0])
    assert ks_distance(original, pruned) == pytest.approx(0.5)
    assert ks_distance(original, pruned) == pytest.approx(
        ks_2samp(original.numpy(), pruned.numpy()).statistic
    )


def test_ks_reward_is_one_over_the_mean_ks_of_each_input_projection() -> None:
    gate, up = _random(24, 8, seed=1), _random(24, 8, seed=2)
    keep = torch.arange(0, 24, 2)
    distances = [
        ks_2samp(
            np.linalg.svd(w.numpy(), compute_uv=False),
            np.linalg.svd(w[keep].numpy(), compute_uv=False),
        ).statistic
        for w in (gate, up)
    ]
    assert ks_reward([gate, up], keep) == pytest.approx(1.0 / np.mean(distances), rel=1e-9)


def test_ks_reward_stays_finite_when_the_spectrum_is_unchanged() -> None:
    matrix = _random(24, 8)
    assert ks_reward([matrix], torch.arange(24)) == pytest.approx(1e3)


# ----- function error ----------------------------------------------------------------------------


def test_function_error_equals_the_directly_computed_relative_output_error() -> None:
    activations = _random(32, 24, seed=3, dtype=torch.float32)  # tokens x d_ff
    output = _random(8, 24, seed=4, dtype=torch.float32)  # d_model x d_ff
    keep = torch.tensor([0, 2, 3, 7, 11, 12, 19, 23])
    dense = activations @ output.T
    pruned = activations[:, keep] @ output[:, keep].T
    expected = (dense - pruned).pow(2).sum() / dense.pow(2).sum()

    energy = output_energy(activations, output)
    assert energy == pytest.approx(float(dense.pow(2).sum()), rel=1e-5)
    assert function_error(activations, output, keep, energy) == pytest.approx(
        float(expected), rel=1e-5
    )


def test_function_error_is_zero_when_every_row_is_kept() -> None:
    activations, output = _random(16, 12, seed=5), _random(6, 12, seed=6)
    energy = output_energy(activations, output)
    assert function_error(activations, output, torch.arange(12), energy) == 0.0


# ----- row spectral statistics -------------------------------------------------------------------


@pytest.mark.parametrize("rank", [16, 5])
def test_row_spectral_stats_leverage_sums_to_the_rank_for_a_full_rank_matrix(rank: int) -> None:
    matrix = _random(64, 16, seed=7)
    leverage, _ = row_spectral_stats(matrix, rank)
    assert leverage.shape == (64,)
    assert float(leverage.double().sum()) == pytest.approx(rank, rel=1e-5)
    assert torch.all(leverage >= 0) and torch.all(leverage <= 1 + 1e-5)


def test_row_spectral_stats_alignment_is_the_abs_cosine_to_the_top_right_singular_vector() -> None:
    matrix = _random(40, 8, seed=8)
    matrix[5] = 10.0 * matrix[5]  # a dominant row: nearly parallel to the top singular vector
    _, alignment = row_spectral_stats(matrix, rank=4)
    top = torch.linalg.svd(matrix).Vh[0]
    expected = (matrix @ top).abs() / matrix.norm(dim=1)
    assert torch.allclose(alignment.double(), expected, atol=1e-5)
    assert int(alignment.argmax()) == 5
    assert torch.all(alignment <= 1 + 1e-6)


def test_wide_matrices_get_the_same_row_stats_from_the_float32_top_of_the_spectrum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above FULL_EIGH_MAX_COLS only the top eigenpairs are computed, in float32 (7B widths)."""
    matrix = (_with_condition_number(300, 120, 1e3, seed=4) * 0.05).float()
    leverage, alignment = row_spectral_stats(matrix, rank=8)
    monkeypatch.setattr(spectral, "FULL_EIGH_MAX_COLS", 100)
    wide_leverage, wide_alignment = row_spectral_stats(matrix, rank=8)
    torch.testing.assert_close(wide_leverage, leverage, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(wide_alignment, alignment, rtol=1e-4, atol=1e-7)
    values, vectors = top_eigenpairs(matrix, 8)
    assert values.dtype == torch.float64 and vectors.shape == (120, 8)
    assert bool(torch.all(values[1:] >= values[:-1]))  # ascending, the largest last
