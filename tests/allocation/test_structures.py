"""A parameter budget split between FFN rows, heads and layers: arithmetic, greedy, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunenet.allocation.structures import parse_structures, split_budget
from prunenet.core.compress import count_parameters
from prunenet.core.config_fields import head_shapes
from prunenet.errors import PruneNetError
from prunenet.pipeline import apply_budget, scorer_planner
from prunenet.scoring.heuristics import MagnitudeScorer
from tests.conftest import ROOMY_GQA, logits_of, start_token_text, tiny_model


@pytest.mark.parametrize("structures", [("ffn",), ("ffn", "heads"), ("ffn", "layers"),
                                        ("ffn", "heads", "layers")])  # fmt: skip
def test_the_cut_model_has_exactly_the_parameters_the_split_predicts(structures) -> None:
    model = tiny_model("llama", **ROOMY_GQA)
    dense = count_parameters(model)
    planner = scorer_planner(MagnitudeScorer())
    pruned, report = apply_budget(model, planner, 0.3, structures, start_token_text(8))
    split = report.structures
    assert count_parameters(pruned) == dense - split["params_removed"]
    assert report.params_before == dense and report.params_after == count_parameters(pruned)
    # Met to within one FFN row per kept layer (the FFN absorbs the rounding).
    per_row = 3 * model.config.hidden_size
    assert 0 <= split["params_removed"] - 0.3 * dense < per_row * 4


@pytest.mark.parametrize("structures", [("heads",), ("layers",), ("ffn", "heads", "layers")])
def test_a_split_with_layers_and_heads_reloads_with_plain_from_pretrained(
    structures, tmp_path
) -> None:
    model = tiny_model("llama", **ROOMY_GQA)
    pruned, report = apply_budget(model, scorer_planner(MagnitudeScorer()), 0.2, structures,
                                  start_token_text(8))  # fmt: skip
    split = report.structures
    if structures != ("ffn", "heads", "layers"):  # one structure: it must have been used
        assert split["layers"] or split["query_heads"] or split["kv_groups"]
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits_of(reloaded), logits_of(pruned))
    assert reloaded.config.num_hidden_layers == 4 - len(split["layers"])
    shape = head_shapes(reloaded.config)[0]
    assert shape.num_heads == (2 - split["kv_groups"]) * (2 - split["query_heads"])


def test_the_greedy_takes_the_structure_that_costs_least_kl_per_parameter() -> None:
    model = tiny_model("llama", **ROOMY_GQA)
    with torch.no_grad():  # layer 2 adds nothing: dropping it is free
        layer = model.model.layers[2]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    split = split_budget(model, 0.3, ("ffn", "layers"), start_token_text(8))
    assert split.steps[0]["structure"] == "layer"
    assert split.layers == [2]
    assert split.steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_the_split_leaves_the_model_untouched() -> None:
    model = tiny_model("llama", **ROOMY_GQA)
    before = logits_of(model)
    split_budget(model, 0.3, ("ffn", "heads", "layers"), start_token_text(8))
    assert torch.equal(logits_of(model), before)


def test_unknown_structures_and_heads_an_architecture_cannot_lose_are_refused() -> None:
    assert parse_structures("layers, ffn") == ("ffn", "layers")
    with pytest.raises(PruneNetError, match="Unknown structure"):
        parse_structures("ffn,neurons")
    with pytest.raises(PruneNetError, match="falcon heads cannot be removed"):
        parse_structures("heads", tiny_model("falcon", alibi=True).config)


@pytest.mark.parametrize("target", [0.0, 1.0, 1.5])
def test_a_budget_outside_0_1_is_refused(target) -> None:
    with pytest.raises(PruneNetError, match="fraction in"):
        split_budget(tiny_model("llama"), target, ("ffn",), start_token_text(8))


def test_a_budget_the_structures_cannot_meet_is_refused_saying_how_much_they_can() -> None:
    model = tiny_model("llama", **ROOMY_GQA)
    with pytest.raises(PruneNetError, match=r"can remove at most \d+\.\d%"):
        split_budget(model, 0.95, ("layers",), start_token_text(8))


def test_past_the_budget_only_ffn_rows_step_when_they_are_allowed() -> None:
    model = tiny_model("llama", **ROOMY_GQA)
    with torch.no_grad():  # layer 2 adds nothing: dropping it is free, but it is a big step
        layer = model.model.layers[2]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    split = split_budget(model, 0.1, ("ffn", "layers"), start_token_text(8))
    assert split.layers == []  # one layer (~20% of this model) would overshoot a 10% budget
    assert split.removed_fraction >= 0.1
    only_layers = split_budget(model, 0.1, ("layers",), start_token_text(8))
    assert only_layers.layers == [2]  # without FFN rows the one step is allowed
