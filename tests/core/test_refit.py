"""The output-projection refit: it repairs the cut on tokens it never saw, and says what it fits."""

from __future__ import annotations

import pytest
import torch

from prunenet.analysis.layer_calls import capture_layer_inputs, ffn_activations
from prunenet.analysis.selfgen import SelfGenConfig, generate_own_text
from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.refit import (
    RIDGE_CANDIDATES,
    _RidgeProblem,
    _RidgeSystem,
    add_to_gram,
    gram_error,
    gram_refit,
    output_error,
    refit_aware_scores,
    refit_output,
)
from prunenet.core.refit import (
    Moments as _Moments,
)
from prunenet.core.surgery import ffn_output_bias, ffn_weights
from prunenet.errors import PruneNetError
from tests.conftest import FFN_WIDTH, tiny_model

KEEP = torch.arange(0, FFN_WIDTH, 2)  # half the neurons


def _self_generated_activations(model_type: str) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Layer 0's FFN activations on 8 self-generated sequences: 6 to fit on, 2 held out."""
    model = tiny_model(model_type)
    tokens = generate_own_text(model, SelfGenConfig(sequences=8, length=32, seed=0))
    hidden, arguments = capture_layer_inputs(model, tokens)
    layer = decoder_layers(model)[0]
    acts = ffn_activations(layer, adapter_for(model.config), hidden, arguments[0])
    held_rows = 2 * tokens.shape[1]
    return acts[:-held_rows], acts[-held_rows:], layer


@pytest.mark.parametrize(("model_type", "intercept"), [("llama", True), ("qwen2", False)])
def test_lsq_refit_lowers_the_output_error_on_held_out_self_generated_tokens(
    model_type: str, intercept: bool
) -> None:
    fit, held, layer = _self_generated_activations(model_type)
    weight = ffn_weights(layer, adapter_for(tiny_model(model_type).config)).output
    result = refit_output(weight, None, KEEP, fit, held, mode="lsq", intercept=intercept)
    plain_cut = output_error(weight, None, KEEP, held, weight[:, KEEP], None)
    refitted = output_error(weight, None, KEEP, held, result.weight, result.bias)
    assert refitted < 0.9 * plain_cut
    assert result.held_error_cut == pytest.approx(plain_cut)


def test_bias_refit_restores_the_dense_mean_output_on_the_fitted_tokens() -> None:
    fit, _, layer = _self_generated_activations("gpt2")
    adapter = adapter_for(tiny_model("gpt2").config)
    weight, bias = ffn_weights(layer, adapter).output, ffn_output_bias(layer, adapter)
    result = refit_output(weight, bias, KEEP, fit, mode="bias")
    dense_mean = (fit.double() @ weight.double().T + bias.double()).mean(dim=0)
    cut_mean = (fit.double()[:, KEEP] @ result.weight.T + result.bias).mean(dim=0)
    torch.testing.assert_close(cut_mean, dense_mean)


def test_a_refit_without_intercept_leaves_the_bias_alone() -> None:
    fit, held, layer = _self_generated_activations("qwen2")
    weight = ffn_weights(layer, adapter_for(tiny_model("qwen2").config)).output
    assert refit_output(weight, None, KEEP, fit, held, mode="lsq", intercept=False).bias is None


def test_the_ridge_comes_from_the_candidates_tried_on_the_held_out_rows() -> None:
    fit, held, layer = _self_generated_activations("llama")
    weight = ffn_weights(layer, adapter_for(tiny_model("llama").config)).output
    result = refit_output(weight, None, KEEP, fit, held, mode="lsq", ridges=(0.5,))
    assert result.ridge == 0.5


def test_bias_refit_without_an_intercept_is_refused() -> None:
    fit, _, layer = _self_generated_activations("qwen2")
    weight = ffn_weights(layer, adapter_for(tiny_model("qwen2").config)).output
    with pytest.raises(PruneNetError, match="needs an output bias"):
        refit_output(weight, None, KEEP, fit, mode="bias", intercept=False)


def _with_a_massive_first_row(intercept: bool):
    """Ordinary rows plus one repeated "massive" row, as SmolLM2's start token has."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 24, generator=generator, dtype=torch.float64)
    rows = torch.randn(400, 24, generator=generator, dtype=torch.float64)
    rows = rows + 0.5 * rows[:, :1]  # correlated neurons, so a refit has something to use
    massive = 300 * torch.randn(1, 24, generator=generator, dtype=torch.float64)
    keep = torch.arange(0, 24, 2)
    bias = torch.zeros(8, dtype=torch.float64) if intercept else None
    return weight, bias, keep, rows[:300], rows[300:], massive


@pytest.mark.parametrize("intercept", [True, False])
def test_an_anchored_row_is_reproduced_exactly_and_the_other_rows_fit_better(
    intercept: bool,
) -> None:
    weight, bias, keep, fit, held, massive = _with_a_massive_first_row(intercept)
    target = massive @ weight.T
    anchored = refit_output(weight, bias, keep, fit, held, intercept=intercept,
                            anchor=(massive[0], target[0]))  # fmt: skip
    new_bias = 0 if anchored.bias is None else anchored.bias
    torch.testing.assert_close(massive[:, keep] @ anchored.weight.T + new_bias, target)
    # The same row fitted like the others (20 copies, as every sequence starts with it) takes
    # over the fit: the ordinary held-out rows come out worse.
    mixed = refit_output(weight, bias, keep, torch.cat([massive.repeat(20, 1), fit]), held,
                         intercept=intercept)  # fmt: skip
    assert anchored.held_error_refit < mixed.held_error_refit


def _refit_error(acts: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor) -> float:
    """Output error on `acts` after an (almost unregularised) lsq refit to rows `keep`."""
    result = refit_output(weight, None, keep, acts, mode="lsq", intercept=False, ridges=(1e-9,))
    return output_error(weight, None, keep, acts, result.weight, None)


def test_refit_aware_selection_removes_first_the_row_whose_removal_the_refit_repairs_best() -> None:
    generator = torch.Generator().manual_seed(3)
    acts = torch.randn(400, 10, generator=generator, dtype=torch.float64)
    acts[:, 7] = acts[:, 2] + 0.05 * acts[:, 7]  # row 7 is almost a copy of row 2
    weight = torch.randn(6, 10, generator=generator, dtype=torch.float64)
    weight[:, 7] *= 4.0  # and the largest: a magnitude rule keeps it
    scores = refit_aware_scores(acts, weight, kept=9, intercept=False, ridge=1e-9)
    errors = [_refit_error(acts, weight, torch.tensor([j for j in range(10) if j != i]))
              for i in range(10)]  # fmt: skip
    assert int(scores.argmin()) == min(range(10), key=errors.__getitem__)
    assert int(scores.argmin()) in (2, 7)


def test_refit_aware_selection_beats_the_largest_rows_once_the_refit_follows() -> None:
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(600, 6, generator=generator, dtype=torch.float64)
    mix = torch.randn(6, 16, generator=generator, dtype=torch.float64)
    acts = base @ mix + 0.1 * torch.randn(600, 16, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, 16, generator=generator, dtype=torch.float64)
    magnitude = acts.pow(2).mean(0).sqrt() * weight.norm(dim=0)
    aware = refit_aware_scores(acts, weight, kept=6, intercept=False, ridge=1e-9)
    top = magnitude.argsort(descending=True)[:6].sort().values
    greedy = aware.argsort(descending=True)[:6].sort().values
    assert _refit_error(acts, weight, greedy) < 0.8 * _refit_error(acts, weight, top)
    removed = aware.argsort()[:10]
    assert aware[removed].lt(0).all() and aware[aware.argsort()[10:]].ge(1).all()


def test_a_refit_of_bf16_activations_and_weights_equals_the_refit_of_their_exact_values() -> None:
    # The moments (x^T x, x^T y) are formed in float64 whatever the inputs' dtype, so a bf16
    # layer is refitted exactly as its values upcast to float32 would be, never in bf16.
    fit, held, layer = _self_generated_activations("llama")
    weight = ffn_weights(layer, adapter_for(tiny_model("llama").config)).output
    fit_bf16, held_bf16, weight_bf16 = fit.bfloat16(), held.bfloat16(), weight.bfloat16()
    low = refit_output(weight_bf16, None, KEEP, fit_bf16, held_bf16, mode="lsq")
    exact = refit_output(weight_bf16.float(), None, KEEP, fit_bf16.float(), held_bf16.float())
    assert low.weight.dtype == torch.float64
    assert torch.equal(low.weight, exact.weight) and torch.equal(low.bias, exact.bias)
    assert low.held_error_refit < 0.9 * low.held_error_cut


def _ridge_reference(x, y, ridge, intercept, anchor):
    """argmin |x_c W - y_c|^2 + ridge * mean diag(x_c^T x_c) |W|^2 (s.t. the anchor row is met),
    from the full (kept + 1) KKT system."""
    x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
    if intercept:
        x, y = x - x_mean, y - y_mean
    gram = x.T @ x
    system = gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    rhs = x.T @ y
    if anchor is not None:
        row, out = anchor
        if intercept:
            row, out = row - x_mean, out - y_mean
        size = system.shape[0]
        corner = torch.zeros(1, 1, dtype=x.dtype)
        system = torch.cat([torch.cat([system, row.reshape(-1, 1)], 1),
                            torch.cat([row.reshape(1, -1), corner], 1)])  # fmt: skip
        rhs = torch.cat([rhs, out.reshape(1, -1)])
        weight = torch.linalg.solve(system, rhs)[:size]
    else:
        weight = torch.linalg.solve(system, rhs)
    bias = y_mean - x_mean @ weight if intercept else None
    return weight.T, bias


@pytest.mark.parametrize("rows", [12, 300])  # fewer rows than kept columns, and more
@pytest.mark.parametrize("intercept", [True, False])
@pytest.mark.parametrize("anchored", [False, True])
def test_the_lsq_refit_is_the_ridge_solution_with_few_rows_as_with_many(rows, intercept, anchored):
    """Below the kept width the refit works in the rows' space: same solution."""
    generator = torch.Generator().manual_seed(3)
    acts = torch.randn(rows + 1, 40, generator=generator, dtype=torch.float64).relu()
    weight = torch.randn(6, 40, generator=generator, dtype=torch.float64)
    bias = torch.randn(6, generator=generator, dtype=torch.float64) if intercept else None
    keep = torch.arange(0, 40, 2)  # 20 kept columns
    first, fit = acts[0], acts[1:]
    target = first @ weight.T + (0 if bias is None else bias)
    anchor = (first, target) if anchored else None
    result = refit_output(weight, bias, keep, fit, intercept=intercept, anchor=anchor)
    y = fit @ weight.T + (0 if bias is None else bias)
    reference_anchor = (first[keep], target) if anchored else None
    want_weight, want_bias = _ridge_reference(fit[:, keep], y, 0.1, intercept, reference_anchor)
    torch.testing.assert_close(result.weight, want_weight, rtol=1e-7, atol=1e-9)
    if intercept:
        torch.testing.assert_close(result.bias, want_bias, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("intercept", [True, False])
@pytest.mark.parametrize("anchored", [False, True])
def test_held_out_errors_from_the_rows_space_equal_those_of_the_formed_solutions(
    intercept, anchored
):
    """The ridge is chosen on held-out rows without forming one solution per ridge."""
    generator = torch.Generator().manual_seed(5)
    acts = torch.randn(20, 40, generator=generator, dtype=torch.float64).relu()
    targets = torch.randn(20, 6, generator=generator, dtype=torch.float64) + acts[:, :6]
    fit, held = _Moments.of(acts[1:13], targets[1:13]), _Moments.of(acts[13:], targets[13:])
    assert fit.rows is not None and held.rows is not None  # 12 and 7 rows < 40 columns
    anchor = (acts[:1], targets[:1]) if anchored else None
    system = _RidgeSystem.of(fit, intercept, anchor)
    errors = system.held_errors(held, RIDGE_CANDIDATES)
    formed = [held.error(*system.solution(ridge)) for ridge in RIDGE_CANDIDATES]
    assert len(set(formed)) == len(formed)  # the ridges really differ on these rows
    assert errors == pytest.approx(formed, rel=1e-10)


def _rows_with_an_anchor(seed: int = 7):
    """Activations (the first row massive), dense weights and bias, and half the columns kept."""
    generator = torch.Generator().manual_seed(seed)
    acts = torch.randn(121, 16, generator=generator, dtype=torch.float64).relu()
    acts[0] *= 40
    weight = torch.randn(5, 16, generator=generator, dtype=torch.float64)
    bias = torch.randn(5, generator=generator, dtype=torch.float64)
    return acts, weight, bias, torch.arange(1, 16, 2)


def _stored_as_a_gram(acts: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """(Gram of [acts, 1], its cross products with the dense output, [W, b]), as the shared
    analysis and the refit reward store a layer."""
    output = torch.cat([weight, bias[:, None]], dim=1)
    gram = add_to_gram(torch.zeros(17, 17, dtype=torch.float64), acts)
    return gram, gram @ output.T, output


@pytest.mark.parametrize("intercept", [True, False])
@pytest.mark.parametrize("anchored", [False, True])
def test_the_cholesky_route_solves_the_ridge_problem_as_the_eigendecomposition_does(
    intercept: bool, anchored: bool
) -> None:
    acts, weight, bias, keep = _rows_with_an_anchor()
    moments = _Moments.of(acts[1:, keep], acts[1:] @ weight.T + bias)
    anchor = (acts[:1, keep], acts[:1] @ weight.T + bias) if anchored else None
    eigen = _RidgeSystem.of(moments, intercept, anchor).solution(0.03)
    coefficients, new_bias = _RidgeProblem.of(moments, intercept, anchor).coefficients(0.03)
    torch.testing.assert_close(coefficients.T, eigen[0], rtol=1e-9, atol=1e-10)
    if intercept:
        torch.testing.assert_close(new_bias, eigen[1], rtol=1e-9, atol=1e-10)
    else:
        assert new_bias is None and eigen[1] is None


def test_moments_read_from_a_gram_of_ones_appended_are_the_rows_moments() -> None:
    acts, weight, bias, keep = _rows_with_an_anchor()
    gram, cross, _ = _stored_as_a_gram(acts, weight, bias)
    stored = _Moments.of_gram(gram, cross, keep)
    direct = _Moments.of(acts[:, keep], acts @ weight.T + bias)
    assert float(stored.count) == direct.count
    for name in ("sum_x", "sum_y", "xx", "xy"):
        torch.testing.assert_close(getattr(stored, name), getattr(direct, name))


def test_a_gram_added_in_chunks_is_the_gram_added_at_once() -> None:
    acts, _, _, _ = _rows_with_an_anchor()
    once = add_to_gram(torch.zeros(17, 17, dtype=torch.float64), acts)
    chunked = add_to_gram(torch.zeros(17, 17, dtype=torch.float64), acts.float(), chunk_rows=50)
    ones = torch.cat([acts, torch.ones(121, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(once, ones.T @ ones)
    torch.testing.assert_close(chunked, once, rtol=1e-6, atol=1e-4)  # float32 rows


@pytest.mark.parametrize("intercept", [True, False])
def test_the_refit_from_a_gram_is_refit_outputs_and_pins_the_anchor(intercept: bool) -> None:
    acts, weight, bias, keep = _rows_with_an_anchor()
    gram, cross, output = _stored_as_a_gram(acts[1:], weight, bias)
    coefficients, new_bias = gram_refit(gram, cross, output, keep, 0.1, intercept, acts[0])
    dense_anchor = acts[0] @ weight.T + bias
    expected = refit_output(weight, bias, keep, acts[1:], intercept=intercept,
                            anchor=(acts[0], dense_anchor))  # fmt: skip
    torch.testing.assert_close(coefficients.T, expected.weight, rtol=1e-9, atol=1e-10)
    if intercept:
        torch.testing.assert_close(new_bias, expected.bias, rtol=1e-9, atol=1e-10)
    refitted = acts[0, keep] @ coefficients + (0 if new_bias is None else new_bias)
    torch.testing.assert_close(refitted, dense_anchor, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("intercept", [True, False])
def test_the_gram_error_is_the_summed_squared_error_over_the_rows(intercept: bool) -> None:
    acts, weight, bias, keep = _rows_with_an_anchor()
    gram, cross, output = _stored_as_a_gram(acts, weight, bias)
    coefficients, new_bias = gram_refit(gram, cross, output, keep, 0.3, intercept)
    dense = acts @ weight.T + bias
    energy = float(dense.pow(2).sum())
    predicted = acts[:, keep] @ coefficients + (0 if new_bias is None else new_bias)
    expected = float((dense - predicted).pow(2).sum())
    assert gram_error(gram, cross, energy, keep, coefficients, new_bias) == pytest.approx(
        expected, rel=1e-8
    )
