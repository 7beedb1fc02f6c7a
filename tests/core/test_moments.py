"""Moments gathered in float32 blocks agree with the float64 ones the refit was built on."""

from __future__ import annotations

import torch

from prunenet.core.moments import Moments
from prunenet.core.refit import refit_moments, refit_output


def _rows(seed: int = 0, rows: int = 600, width: int = 24, offset: float = 1e3):
    # Large means against unit spread: a float32 Gram about zero would lose the centred one.
    generator = torch.Generator().manual_seed(seed)
    acts = torch.randn(rows, width, generator=generator) + offset * torch.rand(
        width, generator=generator
    )
    weight = torch.randn(8, width, generator=generator)
    return acts, weight


def _centred(moments: Moments) -> torch.Tensor:
    xx, _ = moments.products()
    mean = moments.sum_x / moments.count
    return xx - moments.count * torch.outer(mean, mean)


def test_block_moments_keep_the_centred_gram_of_rows_with_large_means() -> None:
    acts, weight = _rows()
    keep = torch.arange(0, 24, 2)
    exact = Moments.of(acts.double()[:, keep], acts.double() @ weight.double().T)
    blocks = Moments.of_blocks(acts, weight, None, keep, block_rows=64)
    centred, expected = _centred(blocks), _centred(exact)
    assert float((centred - expected).norm() / expected.norm()) < 1e-5
    torch.testing.assert_close(blocks.sum_x, exact.sum_x, rtol=1e-6, atol=0)


def test_block_size_does_not_change_the_moments_beyond_float32_rounding() -> None:
    acts, weight = _rows(seed=1)
    keep = torch.arange(24)
    small = Moments.of_blocks(acts.reshape(60, 10, 24), weight, None, keep, 7)
    large = Moments.of_blocks(acts, weight, None, keep, 10_000)
    assert small.count == large.count == 600
    torch.testing.assert_close(_centred(small), _centred(large), rtol=1e-4, atol=1e-3)


def test_fewer_rows_than_kept_columns_keep_the_rows() -> None:
    acts, weight = _rows(rows=10)
    moments = Moments.of_blocks(acts, weight, None, torch.arange(24))
    assert moments.rows is not None and moments.rows[0].dtype == torch.float64


def test_a_refit_from_block_moments_is_the_refit_from_rows() -> None:
    acts, weight = _rows(seed=2, offset=3.0)
    keep = torch.arange(0, 24, 3)
    fit, held = acts[:450], acts[450:]
    from_rows = refit_output(weight, None, keep, fit, held, intercept=True)
    fit_moments = Moments.of_blocks(fit, weight, None, keep)
    held_moments = Moments.of_blocks(held, weight, None, keep)
    from_blocks = refit_moments(weight, None, keep, fit_moments, held_moments, intercept=True)
    assert from_blocks.ridge == from_rows.ridge
    torch.testing.assert_close(from_blocks.weight, from_rows.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_blocks.bias, from_rows.bias, rtol=1e-4, atol=1e-4)


def test_block_moments_read_the_outputs_from_the_gram_as_a_pass_over_them_would() -> None:
    acts, weight = _rows(seed=3, offset=30.0)
    bias = torch.randn(8, generator=torch.Generator().manual_seed(3))
    keep = torch.tensor([0, 3, 4, 9, 10, 17, 23])
    outputs = acts.double() @ weight.double().T + bias.double()
    exact = Moments.of(acts.double()[:, keep], outputs)
    blocks = Moments.of_blocks(acts, weight, bias, keep, block_rows=100)
    torch.testing.assert_close(blocks.sum_y, exact.sum_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(blocks.xy, exact.xy, rtol=1e-5, atol=1e-3)
    assert abs(blocks.yy - exact.yy) <= 1e-6 * exact.yy
