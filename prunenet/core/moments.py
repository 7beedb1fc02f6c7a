"""Moments of a least-squares problem: what the refit reads instead of the rows themselves.

The refit (`prunenet.core.refit`) needs, from the kept activations x and the dense outputs y,
only the count, the sums, x^T x, x^T y and the sum of y^2. They add up over row sets (fit plus
held out), and `Moments.of_blocks` gathers them block by block from the activations a decoder
layer computes, without copying them to float64: products in float32 around a shift near the
mean (so centring loses nothing), sums in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows per float32 block product in `Moments.of_blocks`: small enough that a block's float32
# sums stay accurate and its copies small (8192 x 1536 floats: 50 MB), large enough for BLAS.
BLOCK_ROWS = 8192


def affine(acts: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`acts @ weight.T + bias` (bias None: no bias).

    :param acts: N x d_in rows.
    :param weight: d_out x d_in.
    :param bias: d_out, or None.
    """
    out = acts @ weight.T
    return out if bias is None else out + bias


@dataclass
class Moments:
    """What least squares needs from rows x (kept activations) and targets y: the count, the
    sums, x^T x, x^T y and the sum of y^2 (float64). Moments of two row sets add up.

    With fewer rows than kept columns (a 7B layer keeps ~7.7k of 11k neurons; a few thousand
    tokens of text), the rows themselves are kept instead of x^T x and x^T y: the Gram then has
    rank <= rows, and `_RidgeSystem` works in the rows' space (an eigendecomposition of
    rows x rows instead of kept x kept: 50x faster on LLaMA-2-7B shapes, same solution).
    """

    count: int | torch.Tensor  # a 0-d float64 tensor when read from a Gram (`of_gram`)
    sum_x: torch.Tensor
    sum_y: torch.Tensor
    xx: torch.Tensor | None
    xy: torch.Tensor | None
    yy: float | None  # None from a Gram, whose errors are `gram_error`'s
    rows: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor) -> Moments:
        sums = (x.shape[0], x.sum(dim=0), y.sum(dim=0))
        if x.shape[0] < x.shape[1]:
            return cls(*sums, None, None, float(y.pow(2).sum()), rows=(x, y))
        return cls(*sums, x.T @ x, x.T @ y, float(y.pow(2).sum()))

    @classmethod
    def of_blocks(
        cls,
        acts: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        keep: torch.Tensor,
        block_rows: int = BLOCK_ROWS,
    ) -> Moments:
        """The moments of `acts[..., keep]` and the dense outputs `acts @ weight.T + bias`, a
        block of leading entries at a time, without ever forming the outputs.

        Per block, with z = x - s (s the first block's mean), three float32 products give the
        symmetric Gram of z in parts: kept x kept, kept x removed, removed x removed (1536
        columns split 1075 / 461: 30% fewer operations than the kept Gram plus the dense
        output plus its cross product). Summed in float64, they give the rest exactly: the
        outputs about the shift's output are z W', so x_k'y = G_kk W_k' + G_kr W_r' and
        sum ||y||^2 = tr(W G W'). The float32 rounding is relative to the rows' spread around
        their mean, not to their size, so the centred Gram the ridge reads keeps its small
        eigenvalues (tests/core/test_moments.py measures it against an all-float64 pass).
        With fewer rows than kept columns the rows are kept (`of`'s rows route), in float64.

        :param acts: activations, one row per entry of all dims but the last (e.g. sequences x
            positions x d_ff), any float dtype and device.
        :param weight: the dense neuron-first output weights, d_model x d_ff.
        :param bias: the dense output bias (d_model), or None.
        :param keep: the kept columns of `acts`.
        :param block_rows: rows per float32 block (about; whole leading entries).
        """
        device, width = acts.device, acts.shape[-1]
        f64 = {"dtype": torch.float64, "device": device}
        keep = keep.to(device=device, dtype=torch.long)
        weight = weight.to(**f64)
        bias = torch.zeros(weight.shape[0], **f64) if bias is None else bias.to(**f64)
        count = acts.numel() // width if width else 0
        if count < keep.numel():
            x = acts.reshape(-1, width).double()
            return cls.of(x[:, keep], affine(x, weight, bias))
        kept_mask = torch.zeros(width, dtype=torch.bool, device=device)
        kept_mask[keep] = True
        removed = (~kept_mask).nonzero().reshape(-1)
        per_entry = max(1, count // max(acts.shape[0], 1))
        step = max(1, block_rows // per_entry)
        for start in range(0, acts.shape[0], step):
            block = acts[start : start + step]
            if start == 0:
                shift = block.reshape(-1, width).float().mean(dim=0)
                sizes = (keep.numel(), removed.numel())
                g_kk, g_kr = torch.zeros(sizes[0], sizes[0], **f64), torch.zeros(*sizes, **f64)
                g_rr = torch.zeros(sizes[1], sizes[1], **f64)
                sum_k, sum_r = torch.zeros(sizes[0], **f64), torch.zeros(sizes[1], **f64)
            # One float32 copy, shifted as it is made (a strided block's reshape was another).
            z = torch.sub(block, shift).reshape(-1, width).float()
            # 2-D index_select: on the last dim of a 3-D view it is 5x slower.
            z_k, z_r = z.index_select(1, keep), z.index_select(1, removed)
            g_kk += (z_k.T @ z_k).double()
            g_kr += (z_k.T @ z_r).double()
            g_rr += (z_r.T @ z_r).double()
            sum_k += z_k.sum(dim=0, dtype=torch.float64)
            sum_r += z_r.sum(dim=0, dtype=torch.float64)
        w_k, w_r = weight[:, keep], weight[:, removed]
        xy = g_kk @ w_k.T + g_kr @ w_r.T
        sum_y = sum_k @ w_k.T + sum_r @ w_r.T
        yy = ((w_k @ g_kk) * w_k).sum() + 2 * ((w_k @ g_kr) * w_r).sum()
        yy = yy + ((w_r @ g_rr) * w_r).sum()
        # Back to moments about zero, in float64: sum (x+s)(x+s)' = xx + s sum' + sum s' + n s s'.
        s_x, s_y = shift.double()[keep], affine(shift.double()[None], weight, bias)[0]
        return cls(
            count,
            sum_k + count * s_x,
            sum_y + count * s_y,
            g_kk
            + torch.outer(s_x, sum_k)
            + torch.outer(sum_k, s_x)
            + count * torch.outer(s_x, s_x),
            xy + torch.outer(s_x, sum_y) + torch.outer(sum_k, s_y) + count * torch.outer(s_x, s_y),
            float(yy + 2 * (s_y @ sum_y) + count * (s_y @ s_y)),
        )

    @classmethod
    def of_gram(cls, gram: torch.Tensor, cross: torch.Tensor, keep: torch.Tensor) -> Moments:
        """The kept columns' moments from `gram` = sum x x' over x = [acts, 1] (its last row and
        column hold the sums and the count) and `cross` = sum x' y."""
        width = gram.shape[0] - 1
        return cls(gram[width, width], gram[keep, width], cross[width], gram[keep][:, keep],
                   cross[keep], None)  # fmt: skip

    def __add__(self, other: Moments) -> Moments:
        if self.rows is not None and other.rows is not None:
            x = torch.cat([self.rows[0], other.rows[0]])
            return Moments.of(x, torch.cat([self.rows[1], other.rows[1]]))
        (xx, xy), (other_xx, other_xy) = self.products(), other.products()
        return Moments(self.count + other.count, self.sum_x + other.sum_x,
                        self.sum_y + other.sum_y, xx + other_xx, xy + other_xy,
                        self.yy + other.yy)  # fmt: skip

    def products(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x^T x and x^T y."""
        if self.xx is not None:
            return self.xx, self.xy
        x, y = self.rows
        return x.T @ x, x.T @ y

    def error(self, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
        """Mean squared difference between y and `x @ weight.T + bias` over these rows."""
        if self.rows is not None:
            x, y = self.rows
            predicted = affine(x, weight.double(), None if bias is None else bias.double())
            return float((predicted - y).pow(2).mean())
        coefficients = weight.double().T  # kept x d_model
        squared = self.yy - 2 * float((coefficients * self.xy).sum())
        squared += float((coefficients * (self.xx @ coefficients)).sum())
        if bias is not None:
            bias = bias.double()
            squared += -2 * float(bias @ self.sum_y) + 2 * float(bias @ (self.sum_x @ coefficients))
            squared += self.count * float(bias @ bias)
        return max(squared, 0.0) / (self.count * self.xy.shape[1])
