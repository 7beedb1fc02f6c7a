"""Refit of a cut FFN's output projection, so the smaller layer still computes what it did.

Removing neurons drops their contribution to the FFN output. Two repairs, both fitted on the
layer's own intermediate activations on self-generated text (`prunenet.analysis.sequential`
collects them; this module only does the algebra):

- `bias`: add the removed neurons' mean contribution to the output bias (exact on average);
- `lsq`: ridge least squares of the kept output columns (and, where the architecture can store
  one, an intercept as the bias) so the cut FFN reproduces the dense FFN output. Normal
  equations in float64 (a float32 Gram loses the small eigenvalues; docs/architecture.md), ridge
  = lambda x mean Gram diagonal, lambda chosen on a held-out self-generated split: December's
  experiments found 0.1 right at 64 x 128 tokens and 0.01 overfitting at 8 x 128 (DESIGN.md).

Why this module is long: it is the one place the ridge problem is solved, for three callers:
the sequential cut (`refit_moments`, from `Moments.of_blocks`; `refit_output` does the same
from rows), the shared analysis and the refit reward
(`prunenet.analysis.shared`, `.refit_statistics`: moments stored as one Gram of `x = [acts, 1]`;
`add_to_gram`, `gram_refit`, `gram_error`). All read `Moments`, centred with an intercept, the
ridge x the mean centred kept Gram diagonal, the start token's row reproduced exactly
(`_RidgeProblem`). The routes that solve it are kept as they were, so outputs stay bit for bit,
and tests/core/test_refit.py holds them to the same solution: the cut tries every ridge on one
eigendecomposition (`_RidgeSystem`; in the rows' space when there are fewer rows than kept
neurons, as at 7B widths), the Gram callers solve one ridge per keep set by Cholesky
(`_RidgeProblem.coefficients`) and measure held-out errors in the Gram's trace form
(`gram_error`, not `Moments.error`). The cut chooses the ridge per keep set, the Gram callers
per layer for a reference keep set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunenet.core.moments import Moments, affine
from prunenet.errors import PruneNetError

REFITS = ("none", "bias", "lsq")
# Relative ridges tried on the held-out split (x mean Gram diagonal); DESIGN.md's 0.1 sits inside.
# With the start token anchored, SmolLM2's layers chose 0.01 (the old lower end) 14 of 30 times.
RIDGE_CANDIDATES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
DEFAULT_RIDGE = 0.1
# Ridge of the selection's H (x mean Gram diagonal): most SmolLM2 layers refit best at 0.01.
SELECTION_RIDGE = 0.01


@dataclass
class RefitResult:
    """A cut layer's new output projection and what the refit achieved.

    :param weight: neuron-first output weights, d_model x kept (float64).
    :param bias: the new output bias (d_model, float64), or None for a refit without intercept.
    :param ridge: the relative ridge used (`lsq` only).
    :param held_error_cut: mean squared error against the dense FFN output on the held-out rows
        after the plain cut (None without held-out rows).
    :param held_error_refit: the same after the refit.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    ridge: float | None = None
    held_error_cut: float | None = None
    held_error_refit: float | None = None


def check_refit(refit: str) -> str:
    """`refit` if it names a refit (`REFITS`), else a clear error."""
    if refit not in REFITS:
        raise PruneNetError(f"Unknown refit {refit!r}; choose one of {', '.join(REFITS)}.")
    return refit


def refit_output(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    keep: torch.Tensor,
    fit: torch.Tensor,
    held: torch.Tensor | None = None,
    mode: str = "lsq",
    intercept: bool = True,
    ridges: tuple[float, ...] = RIDGE_CANDIDATES,
    anchor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RefitResult:
    """The output projection that best replaces the dense one once only rows `keep` remain.

    The target is the dense FFN output on the same activations, `acts @ weight.T + bias`.
    (Targeting the dense model's FFN output on its own activations instead, to undo the drift
    of earlier cuts, was measured worse on SmolLM2: docs/results.md, ablation.)

    :param weight: the dense neuron-first output weights, d_model x d_ff.
    :param bias: the dense output bias (d_model), or None.
    :param keep: sorted indices of the kept neurons.
    :param fit: N x d_ff intermediate activations (the output projection's inputs) to fit on.
    :param held: M x d_ff held-out activations to choose the ridge on and measure the errors
        on; None fits with `DEFAULT_RIDGE` and measures nothing.
    :param mode: `bias` (removed neurons' mean contribution into the bias) or `lsq`.
    :param intercept: fit (or keep) a bias; False where the architecture cannot store one.
    :param ridges: relative ridges tried on `held` (`lsq`).
    :param anchor: (activation row, output row) that `lsq` reproduces exactly instead of fitting
        it: the first token's, whose "massive" activations would otherwise dominate the fit
        (`prunenet.analysis.sequential` says why). Leave it out of `fit` and `held`.
    """
    _check_mode(mode, intercept)  # before the pass over the rows
    keep = keep.to(torch.long)
    dense_weight, dense_bias = weight.double(), None if bias is None else bias.double()
    # Everything below reads the rows through their moments (sums, Gram, cross products): one
    # pass over the activations per split, and the all-rows fit is the sum of the two splits'.
    fit = fit.double()
    fit_moments = Moments.of(fit[:, keep], affine(fit, dense_weight, dense_bias))
    held_moments = None
    if held is not None:
        held = held.double()
        held_moments = Moments.of(held[:, keep], affine(held, dense_weight, dense_bias))
    if anchor is not None:
        anchor = (anchor[0].double().reshape(-1), anchor[1])
    return refit_moments(weight, bias, keep, fit_moments, held_moments, mode, intercept, ridges,
                         anchor)  # fmt: skip


def _check_mode(mode: str, intercept: bool) -> None:
    if mode not in ("bias", "lsq"):
        raise PruneNetError(f"Unknown refit {mode!r}; choose one of {', '.join(REFITS[1:])}.")
    if mode == "bias" and not intercept:
        raise PruneNetError("--refit bias needs an output bias; this architecture has none.")


def refit_moments(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    keep: torch.Tensor,
    fit: Moments,
    held: Moments | None = None,
    mode: str = "lsq",
    intercept: bool = True,
    ridges: tuple[float, ...] = RIDGE_CANDIDATES,
    anchor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RefitResult:
    """`refit_output` from the kept columns' moments (`Moments.of_blocks`) instead of the rows.

    :param weight: the dense neuron-first output weights, d_model x d_ff.
    :param bias: the dense output bias (d_model), or None.
    :param keep: sorted indices of the kept neurons.
    :param fit: moments of the kept activations and the dense outputs to fit on.
    :param held: the same on held-out rows (the ridge is chosen on them), or None.
    :param mode: `bias` or `lsq`.
    :param intercept: fit (or keep) a bias.
    :param ridges: relative ridges tried on `held` (`lsq`).
    :param anchor: (full activation row d_ff, its dense output row) reproduced exactly (`lsq`).
    """
    _check_mode(mode, intercept)
    weight = weight.double()
    bias = None if bias is None else bias.double()
    keep = keep.to(device=weight.device, dtype=torch.long)
    cut_weight = weight[:, keep]
    if bias is None and intercept:
        bias = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    cut_bias = bias
    if mode == "bias":
        lost = (fit.sum_y - fit.sum_x @ cut_weight.T) / fit.count
        lost = lost - (0 if cut_bias is None else cut_bias)
        result = RefitResult(cut_weight, cut_bias + lost)
    else:
        if anchor is not None:
            row = anchor[0].double().reshape(1, -1)[:, keep.to(anchor[0].device)]
            anchor = (row, anchor[1].double().reshape(1, -1))
        result = _least_squares(fit, held, intercept, ridges, anchor)
    if held is not None:
        result.held_error_cut = held.error(cut_weight, cut_bias)
        result.held_error_refit = held.error(result.weight, result.bias)
    return result


def output_error(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    keep: torch.Tensor,
    acts: torch.Tensor,
    new_weight: torch.Tensor,
    new_bias: torch.Tensor | None,
) -> float:
    """Mean squared difference between the dense FFN output and the cut one on `acts`.

    :param weight: dense neuron-first output weights, d_model x d_ff.
    :param bias: dense output bias, or None.
    :param keep: the kept neurons.
    :param acts: M x d_ff activations.
    :param new_weight: the cut layer's output weights, d_model x kept.
    :param new_bias: the cut layer's output bias, or None.
    """
    dense = affine(acts.double(), weight.double(), None if bias is None else bias.double())
    return target_error(acts, dense, keep, new_weight, new_bias)


def target_error(
    acts: torch.Tensor,
    target: torch.Tensor,
    keep: torch.Tensor,
    new_weight: torch.Tensor,
    new_bias: torch.Tensor | None,
) -> float:
    """Mean squared difference between `target` and the cut FFN's output on `acts`.

    :param acts: M x d_ff activations.
    :param target: M x d_model outputs to reproduce.
    :param keep: the kept neurons.
    :param new_weight: the cut layer's output weights, d_model x kept.
    :param new_bias: the cut layer's output bias, or None.
    """
    cut = affine(acts.double()[:, keep.to(torch.long)], new_weight.double(), new_bias)
    return float((target.double() - cut).pow(2).mean())


def _least_squares(fit, held, intercept, ridges, anchor=None) -> RefitResult:
    """Ridge least squares from `Moments`; the ridge that does best on `held` is refitted on
    all rows."""
    candidates = tuple(ridges) if held is not None else (DEFAULT_RIDGE,)
    system = _RidgeSystem.of(fit, intercept, anchor)
    if held is None:
        new_weight, new_bias = system.solution(DEFAULT_RIDGE)
        return RefitResult(new_weight, new_bias, ridge=DEFAULT_RIDGE)
    if held.rows is not None and fit.rows is not None:
        errors = system.held_errors(held, candidates)
    else:
        errors = [held.error(*system.solution(ridge)) for ridge in candidates]
    best = lowest_error(candidates, errors)
    new_weight, new_bias = _RidgeSystem.of(fit + held, intercept, anchor).solution(best)
    return RefitResult(new_weight, new_bias, ridge=best)


def lowest_error(candidates: tuple[float, ...], errors: list[float]) -> float:
    """The candidate ridge with the smallest held-out error (the first of equals).

    :param candidates: relative ridges tried.
    :param errors: their held-out errors, in the same order.
    """
    return candidates[min(range(len(errors)), key=errors.__getitem__)]


@dataclass
class _RidgeProblem:
    """The refit's ridge problem read from `Moments`, shared by every route that solves it.

    With an intercept the Gram and cross products are centred (which fits the intercept exactly
    and leaves it out of the ridge penalty) and so is the anchor; the ridge is relative to
    `scale`, the mean diagonal of the (centred) kept Gram.
    """

    gram: torch.Tensor | None  # kept x kept; None when the moments keep their rows
    cross: torch.Tensor | None  # kept x d_model
    scale: float | None  # None when the moments keep their rows (`_row_space_eigen`'s)
    acts_mean: torch.Tensor | None  # None without intercept
    target_mean: torch.Tensor | None
    anchor: tuple[torch.Tensor, torch.Tensor] | None  # (row, output), centred with an intercept

    @classmethod
    def of(cls, moments: Moments, intercept: bool, anchor=None) -> _RidgeProblem:
        acts_mean, target_mean = moments.sum_x / moments.count, moments.sum_y / moments.count
        gram = cross = scale = None
        if moments.rows is None:
            gram, cross = moments.xx, moments.xy
            if intercept:
                gram = gram - moments.count * torch.outer(acts_mean, acts_mean)
                cross = cross - moments.count * torch.outer(acts_mean, target_mean)
            # A layer whose kept neurons never fire has a zero Gram; any positive scale keeps
            # it solvable (and an empty keep set has no diagonal at all).
            scale = float(gram.diagonal().mean().clamp_min(1e-12)) if gram.numel() else 1.0
        if anchor is not None and intercept:  # the bias moves with the weights
            anchor = (anchor[0] - acts_mean, anchor[1] - target_mean)
        if not intercept:
            acts_mean = target_mean = None
        return cls(gram, cross, scale, acts_mean, target_mean, anchor)

    def coefficients(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(coefficients kept x d_model, bias or None) for one relative ridge, by a Cholesky
        solve of the kept Gram (the Gram callers' route: one factorisation per keep set). The
        anchor's correction is the smallest (in the ridge's metric) that reproduces its row."""
        gram = self.gram.clone()
        gram.diagonal().add_(ridge * self.scale)
        row = None if self.anchor is None else self.anchor[0].reshape(-1)
        right = self.cross if row is None else torch.cat([self.cross, row[:, None]], dim=1)
        factor, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:
            solved = torch.cholesky_solve(right, factor)
        else:  # only if rounding breaks positive definiteness
            solved = torch.linalg.lstsq(gram, right).solution
        coefficients = solved[:, : self.cross.shape[1]]
        if row is not None:
            direction = solved[:, -1]  # M^-1 row
            norm = float(row @ direction)
            if norm > 0:
                residual = self.anchor[1].reshape(-1) - row @ coefficients
                coefficients = coefficients + torch.outer(direction, residual / norm)
        bias = None
        if self.acts_mean is not None:
            bias = self.target_mean - self.acts_mean @ coefficients
        return coefficients, bias


@dataclass
class _RidgeSystem:
    """One eigendecomposition of the (centred) Gram, from which every ridge's solution follows.

    With an `anchor` (kept activation row, output row) every solution reproduces that row
    exactly: the ridge solution plus the smallest correction (in the ridge's metric) that meets
    the one linear constraint.
    """

    eigenvalues: torch.Tensor  # rank
    eigenvectors: torch.Tensor  # kept x rank
    projected: torch.Tensor  # rank x d_model: eigenvectors^T x^T y (centred)
    scale: float  # mean Gram diagonal: ridges are relative to it
    acts_mean: torch.Tensor | None  # None without intercept
    target_mean: torch.Tensor | None
    anchor: tuple[torch.Tensor, torch.Tensor] | None  # (row 1 x kept, out 1 x d_model), centred
    row_projected: torch.Tensor | None = None  # rank x 1
    # The anchor row's part outside the eigenvectors' span (rows' space only; else None).
    rest: torch.Tensor | None = None

    @classmethod
    def of(cls, moments: Moments, intercept: bool, anchor=None) -> _RidgeSystem:
        problem = _RidgeProblem.of(moments, intercept, anchor)
        if moments.rows is not None:
            eigenvalues, eigenvectors, projected, scale = _row_space_eigen(moments, intercept)
        else:
            scale = problem.scale
            eigenvalues, eigenvectors = torch.linalg.eigh(problem.gram)
            projected = eigenvectors.T @ problem.cross
        system = cls(eigenvalues.clamp_min(0), eigenvectors, projected, scale, problem.acts_mean,
                     problem.target_mean, problem.anchor)  # fmt: skip
        if problem.anchor is not None:
            row = problem.anchor[0]  # 1 x kept
            system.row_projected = eigenvectors.T @ row.T
            # From the rows, the eigenvectors span only the Gram's range; on the rest of the
            # kept columns the Gram is zero, so M^-1 is 1 / (ridge x scale) there.
            if moments.rows is not None:
                system.rest = row.T - eigenvectors @ system.row_projected
        return system

    def _denominators(self, ridge: float) -> torch.Tensor:
        return (self.eigenvalues + ridge * self.scale).unsqueeze(1)

    def _correction(self, ridge: float, denominators: torch.Tensor):
        """(M^-1 row^T in the eigenvectors' coordinates, its rest coefficient, the row's
        correction 1 x d_model) of the anchor, or None when it constrains nothing."""
        row, out = self.anchor
        in_span = self.row_projected / denominators
        rest_coefficient = 1.0 / (ridge * self.scale) if self.rest is not None else 0.0
        norm = float(self.row_projected.T @ in_span)
        if self.rest is not None:
            norm += rest_coefficient * float(row @ self.rest)
        if norm <= 0:
            return None
        fitted = self.row_projected.T @ (self.projected / denominators)  # row @ coefficients
        return in_span, rest_coefficient, (out - fitted) / norm

    def solution(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight d_model x kept, bias or None) for one relative ridge."""
        denominators = self._denominators(ridge)
        coefficients = self.eigenvectors @ (self.projected / denominators)  # kept x d_model
        correction = None if self.anchor is None else self._correction(ridge, denominators)
        if correction is not None:
            in_span, rest_coefficient, amount = correction
            direction = self.eigenvectors @ in_span  # M^-1 row^T
            if self.rest is not None:
                direction = direction + self.rest * rest_coefficient
            coefficients = coefficients + direction @ amount
        bias = None
        if self.acts_mean is not None:
            bias = self.target_mean - self.acts_mean @ coefficients
        return coefficients.T.contiguous(), bias

    def held_errors(self, held: Moments, ridges: tuple[float, ...]) -> list[float]:
        """`held.error(*self.solution(r))` for every ridge r, without forming any kept x d_model
        solution: held rows are projected on the eigenvectors once (the rows' space route,
        where that product is 20x smaller than one solution)."""
        x, y = held.rows
        if self.acts_mean is not None:
            x, y = x - self.acts_mean, y - self.target_mean
        coordinates = x @ self.eigenvectors  # held x rank
        rest = None if self.rest is None else x @ self.rest  # held x 1
        errors = []
        for ridge in ridges:
            denominators = self._denominators(ridge)
            predicted = coordinates @ (self.projected / denominators)
            correction = None if self.anchor is None else self._correction(ridge, denominators)
            if correction is not None:
                in_span, rest_coefficient, amount = correction
                along = coordinates @ in_span
                if rest is not None:
                    along = along + rest * rest_coefficient
                predicted = predicted + along @ amount
            errors.append(float((predicted - y).pow(2).mean()))
        return errors


def _row_space_eigen(moments: Moments, intercept: bool):
    """The Gram's eigenpairs with nonzero eigenvalue, from the rows (fewer than the columns).

    x^T x = V S V^T with V = x^T U S^-1/2, where x x^T = U S U^T (rows x rows). The targets'
    cross products x^T y lie in V's span, so the ridge solution never leaves it.
    :return: (eigenvalues, eigenvectors kept x rank, V^T x^T y, mean Gram diagonal).
    """
    x, y = moments.rows
    if intercept:
        x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    kernel_values, kernel_vectors = torch.linalg.eigh(x @ x.T)
    nonzero = kernel_values > kernel_values.max().clamp_min(0) * x.shape[0] * 1e-13
    values, vectors = kernel_values[nonzero], kernel_vectors[:, nonzero]
    roots = values.sqrt()
    eigenvectors = (x.T @ vectors) / roots
    projected = roots.unsqueeze(1) * (vectors.T @ y)  # V^T x^T y = S^1/2 U^T y
    scale = max(float(values.sum()) / x.shape[1], 1e-12)
    return values, eigenvectors, projected, scale


def add_to_gram(
    gram: torch.Tensor, rows: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """Add `sum x x'` over `x = [row, 1]` to `gram` in place, in float64 on the CPU (the last
    row and column accumulate the sums and the row count).

    :param gram: `(width + 1) x (width + 1)` float64 accumulator.
    :param rows: N x width activations (any dtype or device).
    :param chunk_rows: rows per float64 update (bounds the float64 copy); None adds all at once.
    :return: `gram`.
    """
    step = rows.shape[0] if chunk_rows is None else chunk_rows
    for start in range(0, rows.shape[0], max(step, 1)):
        chunk = rows[start : start + step].double().cpu()
        chunk = torch.cat([chunk, torch.ones(chunk.shape[0], 1, dtype=torch.float64)], dim=1)
        gram.addmm_(chunk.T, chunk)
    return gram


def gram_refit(
    gram: torch.Tensor,
    cross: torch.Tensor,
    output: torch.Tensor,
    keep: torch.Tensor,
    ridge: float,
    intercept: bool,
    anchor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `lsq` refit of a layer cut to `keep`, from its moments stored as one Gram: the same
    solution as `refit_output` on the rows (without held-out rows, at `ridge`), by Cholesky.

    :param gram: `(d_ff + 1) x (d_ff + 1)` float64 `sum x x'` over `x = [acts, 1]`, the start
        token's rows left out (`add_to_gram`).
    :param cross: `(d_ff + 1) x d_model` `sum x' y`, y the dense output (`gram @ output.T`).
    :param output: `d_model x (d_ff + 1)` dense output weights, the output bias as last column.
    :param keep: indices of the kept neurons.
    :param ridge: relative ridge (x the mean diagonal of the centred kept Gram).
    :param intercept: fit an output bias.
    :param anchor: the start token's activation row (d_ff), reproduced exactly; None pins none.
    :return: (coefficients kept x d_model, i.e. the new output weights transposed, bias or None).
    """
    keep = keep.to(torch.long).reshape(-1)
    pinned = None
    if anchor is not None:
        width = gram.shape[0] - 1
        pinned = (anchor[keep], output[:, :width] @ anchor + output[:, width])
    problem = _RidgeProblem.of(Moments.of_gram(gram, cross, keep), intercept, pinned)
    return problem.coefficients(ridge)


def gram_error(
    gram: torch.Tensor,
    cross: torch.Tensor,
    energy: float,
    keep: torch.Tensor,
    coefficients: torch.Tensor,
    bias: torch.Tensor | None,
) -> float:
    """Summed squared difference between y and `x[keep] @ coefficients + bias` over a Gram's
    rows, without a pass over them: `energy - 2 tr(B' cross[K]) + tr(B' G[K, K] B)`, B the
    coefficients with the bias appended (and K with the intercept column).

    :param gram: the rows' `(d_ff + 1) x (d_ff + 1)` Gram.
    :param cross: their `(d_ff + 1) x d_model` `sum x' y`.
    :param energy: their `sum ||y||^2`.
    :param keep: indices of the kept neurons (as long).
    :param coefficients: kept x d_model (`gram_refit`).
    :param bias: d_model, or None.
    """
    columns = keep
    if bias is not None:
        coefficients = torch.cat([coefficients, bias[None]])
        columns = torch.cat([keep, keep.new_tensor([gram.shape[0] - 1])])
    block = gram[columns][:, columns]
    error = (
        energy
        - 2 * float((coefficients * cross[columns]).sum())
        + float((coefficients * (block @ coefficients)).sum())
    )
    return max(error, 0.0)


@torch.no_grad()
def refit_aware_scores(
    acts: torch.Tensor,
    weight: torch.Tensor,
    kept: int,
    intercept: bool = True,
    ridge: float = SELECTION_RIDGE,
    block: int = 1,
) -> torch.Tensor:
    """Row scores for a cut the `lsq` refit follows: the neurons whose loss the refit repairs
    best go first (greedy Optimal Brain Surgeon on the output projection, as ZipLM/SlimGPT do).

    Removing neuron i and refitting the rest raises the squared output error by
    ||W[:, i]||^2 / [H^-1]_ii, where H = acts^T acts + ridge: a neuron whose activation the
    others can reconstruct costs little however large its weights. After each removal the
    surviving columns take the optimal correction (`W -= W[:, i] H^-1[i, :] / H^-1[i, i]`) and
    H^-1 is downdated, so the next choice knows what the refit will do.

    :param acts: N x d_ff fitting activations (the start token's rows left out).
    :param weight: dense neuron-first output weights, d_model x d_ff.
    :param kept: rows that will be kept; the other d_ff - kept are removed in greedy order.
    :param intercept: the refit fits a bias (activations centred, as `_RidgeSystem` does).
    :param ridge: relative ridge (x mean Gram diagonal) of H.
    :param block: neurons removed per downdate (1 is exact greedy; larger is faster).
    :return: d_ff scores, higher = keep; the `d_ff - kept` lowest are the greedy removals, in
        order.
    """
    width = acts.shape[1]
    remove = width - kept
    x = acts.double()
    if intercept:
        x = x - x.mean(dim=0)
    gram = x.T @ x
    scale = float(gram.diagonal().mean().clamp_min(1e-12))
    gram.diagonal().add_(ridge * scale)
    inverse = torch.linalg.inv(gram)
    w = weight.double().clone()
    alive = torch.ones(width, dtype=torch.bool)
    scores = torch.empty(width, dtype=torch.float64)
    step = 0
    while step < remove:
        diagonal = inverse.diagonal().clamp_min(1e-300)
        costs = w.pow(2).sum(dim=0) / diagonal
        costs[~alive] = float("inf")
        take = min(block, remove - step)
        chosen = torch.topk(costs, take, largest=False).indices
        for i in chosen.tolist():
            pivot = float(inverse[i, i])
            if pivot > 0:
                row = inverse[i].clone()
                w -= torch.outer(w[:, i], row) / pivot
                inverse -= torch.outer(inverse[:, i], row) / pivot
            w[:, i] = 0
            inverse[i, :] = 0
            inverse[:, i] = 0
            alive[i] = False
            scores[i] = step - remove  # removed first = lowest
            step += 1
    if remove < width:
        diagonal = inverse.diagonal().clamp_min(1e-300)
        survivors = torch.nonzero(alive).squeeze(1)
        final = w[:, survivors].pow(2).sum(dim=0) / diagonal[survivors]
        # Kept rows rank above every removal, in order of what removing them would cost.
        ranks = torch.argsort(torch.argsort(final)).double()
        scores[survivors] = 1.0 + ranks
    return scores.float()
