"""Per-layer strategies: the budget met exactly, the masked KL equal to the evaluation's KL of
the real cut, the search baseline deterministic, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunenet.allocation.strategy import (
    DROP_LEVEL,
    KL_SEQUENCES,
    RESIDUAL_SCALE,
    STRATEGY_LENGTH,
    STRATEGY_SEQUENCES,
    STRUCTURES,
    StrategyContext,
    depth_ramp_actions,
    on_base,
    ramp_search,
    random_search,
    realise,
    strategy_tokens,
    uniform_actions,
)
from prunenet.allocation.structures import Costs
from prunenet.core.compress import count_parameters
from prunenet.errors import PruneNetError
from prunenet.evaluation.divergence import kl_and_perplexity
from prunenet.io.loading import load_pruned
from prunenet.pipeline import PrunePlan, apply_strategy, scorer_planner
from prunenet.scoring.heuristics import MagnitudeScorer
from tests.conftest import ROOMY_GQA, logits_of, start_token_text, tiny_model


@pytest.fixture(scope="module")
def context() -> StrategyContext:
    return StrategyContext(tiny_model("llama", **ROOMY_GQA), start_token_text())


def _context_planner(context: StrategyContext, kept: list[int]):
    """A planner ranking FFN rows by the scores the masks used (so cut = mask)."""

    def plan(model, ratio):
        scores = [context.ffn_scores[i] for i in kept]
        return PrunePlan(scores, [s.numel() for s in scores], {"scorer": "context"})

    return plan


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("refit_biases", [False, True])
def test_any_actions_meet_the_budget_to_within_one_ffn_row(seed, refit_biases) -> None:
    model = tiny_model("llama", **ROOMY_GQA)
    costs = Costs(model, refit_biases)
    actions = np.random.default_rng(seed).uniform(-1, 1, (4, 3))
    strategy = realise(actions, 0.3, costs, STRUCTURES)
    goal = round(0.3 * costs.dense)
    one_row = max(costs.per_row) + costs.bias_per_row
    assert goal <= strategy.params_removed < goal + one_row
    assert strategy.params_removed == costs.removed(strategy.ffn_rows, strategy.query_heads, 0,
                                                    strategy.layers)  # fmt: skip


@pytest.mark.parametrize("refit", ["none", "lsq"])
def test_the_cut_model_has_exactly_the_parameters_the_strategy_predicts(refit, tmp_path) -> None:
    model = tiny_model("llama", **ROOMY_GQA)
    dense = count_parameters(model)
    actions = np.array([[0.8, 0.0, 0.0], [-0.5, 0.9, 0.0], [0.0, 0.0, 0.0], [0.3, 0.0, 0.9]])
    strategy = realise(actions, 0.3, Costs(model, refit != "none"), STRUCTURES)
    assert strategy.layers == [3] and strategy.query_heads[1] == 1  # both were used
    scores = StrategyContext(model, start_token_text(), describe=False).head_rank
    pruned, report = apply_strategy(model, scorer_planner(MagnitudeScorer()), strategy, scores,
                                    start_token_text(), refit=refit)  # fmt: skip
    assert count_parameters(pruned) == dense - strategy.params_removed
    assert report.structures["ffn_rows"] == strategy.ffn_rows
    pruned.save_pretrained(tmp_path)  # per-layer widths and heads: the prunenet loader
    assert torch.equal(logits_of(load_pruned(tmp_path)), logits_of(pruned))


def test_all_zero_actions_cut_every_layer_alike_and_nothing_else() -> None:
    strategy = realise(uniform_actions(4), 0.2, Costs(tiny_model("llama", **ROOMY_GQA)))
    assert max(strategy.ffn_rows) - min(strategy.ffn_rows) <= 1
    assert strategy.layers == [] and strategy.query_heads == [0, 0, 0, 0]


def test_higher_ffn_exponents_take_more_rows_from_their_layers() -> None:
    actions = np.zeros((4, 3))
    actions[2, 0], actions[0, 0] = 1.0, -1.0
    rows = realise(actions, 0.2, Costs(tiny_model("llama", **ROOMY_GQA))).ffn_rows
    assert rows[2] > rows[1] > rows[0]


def test_drops_beyond_the_budget_are_not_taken() -> None:
    costs = Costs(tiny_model("llama", **ROOMY_GQA))
    actions = np.zeros((4, 3))
    actions[:, 2] = [0.9, 0.8, DROP_LEVEL + 0.1, 0.0]  # three layers proposed
    strategy = realise(actions, 0.3, costs, ("ffn", "layers"))
    share = costs.layer[0] / costs.dense
    assert share < 0.3 < 2 * share  # one layer fits 30%, two do not
    assert strategy.layers == [0]


def test_structures_left_out_are_ignored() -> None:
    actions = np.ones((4, 3))
    strategy = realise(actions, 0.2, Costs(tiny_model("llama", **ROOMY_GQA)), ("ffn",))
    assert strategy.layers == [] and not any(strategy.query_heads)


@pytest.mark.parametrize(
    "actions",
    [np.zeros((4, 3)), np.array([[0.5, 0, 0], [-0.5, 0.9, 0], [0, 0, 0.9], [0.2, 0, 0]])],
    ids=["uniform", "heads-and-a-layer"],
)
def test_the_masked_kl_equals_the_evaluation_kl_of_the_real_cut(context, actions) -> None:
    strategy = realise(actions, 0.25, context.costs, STRUCTURES)
    masked_kl = context.kl(strategy)
    kept = [i for i in range(4) if i not in strategy.layers]
    pruned, _ = apply_strategy(context.model, _context_planner(context, kept), strategy,
                               context.head_rank, start_token_text())  # fmt: skip
    kl, _ = kl_and_perplexity(context.model, pruned, context.windows)
    assert masked_kl > 0
    assert masked_kl == pytest.approx(kl.mean_kl, rel=1e-4, abs=1e-7)


def test_measuring_leaves_the_dense_model_untouched(context) -> None:
    before = logits_of(context.model)
    context.kl(realise(np.ones((4, 3)), 0.3, context.costs, STRUCTURES))
    assert torch.equal(logits_of(context.model), before)


def test_the_search_baseline_is_deterministic_and_never_worse_than_uniform(context) -> None:
    first = random_search(context, 0.3, 6, STRUCTURES, seed=3)
    again = random_search(context, 0.3, 6, STRUCTURES, seed=3)
    uniform = context.kl(realise(uniform_actions(4), 0.3, context.costs, STRUCTURES))
    assert first.to_dict() == again.to_dict()
    assert first.kl <= uniform


def test_a_budget_the_ffn_cannot_fill_is_refused() -> None:
    with pytest.raises(PruneNetError, match="cannot be met"):
        realise(np.zeros((4, 3)), 0.95, Costs(tiny_model("llama", **ROOMY_GQA)), ("ffn",))


def test_a_strategy_without_ffn_is_refused() -> None:
    with pytest.raises(PruneNetError, match="ffn"):
        realise(np.zeros((4, 3)), 0.2, Costs(tiny_model("llama", **ROOMY_GQA)), ("layers",))


def test_a_depth_ramp_takes_more_rows_from_deeper_layers_and_zero_slope_is_uniform() -> None:
    costs = Costs(tiny_model("llama", **ROOMY_GQA))
    ramp = realise(depth_ramp_actions(4, 0.5), 0.2, costs, ("ffn",)).ffn_rows
    assert ramp == sorted(ramp) and ramp[-1] > ramp[0]
    flat = realise(depth_ramp_actions(4, 0.0), 0.2, costs, ("ffn",)).ffn_rows
    assert flat == realise(uniform_actions(4), 0.2, costs, ("ffn",)).ffn_rows


def test_the_ramp_search_keeps_the_slope_with_the_least_kl(context) -> None:
    best = ramp_search(context, 0.25, slopes=(0.0, 0.3, 0.6))
    kls = [context.kl(realise(depth_ramp_actions(4, s), 0.25, context.costs, ("ffn",)))
           for s in (0.0, 0.3, 0.6)]  # fmt: skip
    assert best.kl == pytest.approx(min(kls), rel=1e-12)
    assert best.extra["slope"] == (0.0, 0.3, 0.6)[kls.index(min(kls))]


def test_on_base_moves_the_ramps_ffn_exponents_by_the_scaled_proposal(context) -> None:
    ramp = context.best_ramp(0.2)
    proposals = np.array([[1.0, 0.4, 0.9], [0.0, 0.0, 0.0], [-1.0, 0.2, 0.0], [0.5, 0.0, 0.1]])
    actions = on_base(proposals, ramp)
    expected = depth_ramp_actions(4, ramp.extra["slope"])[:, 0] + RESIDUAL_SCALE * proposals[:, 0]
    np.testing.assert_allclose(actions[:, 0], expected)
    np.testing.assert_array_equal(actions[:, 1:], proposals[:, 1:])
    np.testing.assert_array_equal(on_base(proposals, None), proposals)


def test_the_best_ramp_is_measured_once_per_budget(context) -> None:
    first = context.best_ramp(0.15)
    before = context.evaluations
    assert context.best_ramp(0.15) is first
    assert context.evaluations == before
    assert first.kl == ramp_search(context, 0.15).kl


def test_a_centred_search_starts_from_its_centre_and_never_does_worse(context) -> None:
    centre = depth_ramp_actions(4, 0.4)
    at_centre = context.kl(realise(centre, 0.3, context.costs, ("ffn",)))
    one = random_search(context, 0.3, 1, ("ffn",), center=centre)
    assert one.kl == pytest.approx(at_centre, rel=1e-12) and one.extra["centered"]
    several = random_search(context, 0.3, 5, ("ffn",), seed=2, spread=0.25, center=centre)
    assert several.kl <= at_centre


def test_strategies_read_the_runs_text_with_its_last_sequences_held_out() -> None:
    # Row i of the text is all i: which rows the strategy reads is visible in its first column.
    rows = 256
    text = torch.arange(rows).repeat_interleave(256).reshape(rows, 256)
    part = strategy_tokens(text)
    assert part.shape == (STRATEGY_SEQUENCES, STRATEGY_LENGTH)
    fitted = list(range(STRATEGY_SEQUENCES - KL_SEQUENCES))
    held = list(range(rows - KL_SEQUENCES, rows))  # the cut holds out the text's last quarter
    assert part[:, 0].tolist() == fitted + held
    small = strategy_tokens(text[:8, :20])  # a text below the strategy's share is read whole
    assert small.shape == (8, 20) and small[:, 0].tolist() == list(range(8))
