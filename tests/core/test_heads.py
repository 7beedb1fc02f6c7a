"""Attention-head removal: for every architecture whose head counts live in its own config
fields, the cut model computes what zeroing the removed heads' output columns computes, reloads
with identical logits, keeps a valid GQA grouping, and loses exactly the heads' parameters; what
cannot lose heads refuses clearly. The architectures whose counts are recorded apart (OPT,
GPT-2, GPT-NeoX, Falcon, Phi with qk_layernorm) are specified in test_heads_derived.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunenet.core.arch import ADAPTERS, adapter_for, decoder_layers, head_removal_blocker
from prunenet.core.config_fields import head_shapes
from prunenet.core.heads import (
    HeadKeep,
    attention_parameters,
    cut_heads,
    head_costs,
    keep_first,
    prune_heads,
    select_heads,
)
from prunenet.core.surgery import attention_modules, head_weights, qkv_row_heads
from prunenet.errors import PruneNetError
from tests.conftest import ALL_MODEL_TYPES, TINY_CONFIGS, logits_of, tiny_model

# Architectures whose head counts (and head_dim) go in their own config fields, so uniform cuts
# reload with plain from_pretrained (prunenet/core/heads.py has the table); they all have GQA.
REMOVABLE = [t for t in ALL_MODEL_TYPES if ADAPTERS[t].attention.head_dim_field is not None]
# Their modeling code derives head_dim = hidden_size / heads: counts are recorded apart.
DERIVED_HEAD_SIZE = ["falcon", "gpt2", "gpt_neox", "opt"]
# Falcon's three fused layouts, as its config expresses them.
FALCON_LAYOUTS = {
    "multi_query": {"num_attention_heads": 4},
    "multi_head": {"num_attention_heads": 4, "multi_query": False},
    "new_decoder_architecture": {
        "num_attention_heads": 4,
        "num_kv_heads": 2,
        "new_decoder_architecture": True,
    },
}


def gqa_model(model_type: str, seed: int = 1234, **overrides):
    """A tiny model with 4 query heads in 2 KV groups where the architecture has GQA (4
    independent heads where it has only multi-head attention)."""
    heads = {"num_attention_heads": 4}
    if ADAPTERS[model_type].attention.kv_heads == "field":
        heads["num_key_value_heads"] = 2
    if model_type == "gpt2":
        heads = {"n_head": 4}
    if model_type == "gemma3":
        text = {**TINY_CONFIGS["gemma3"]["text_config"], **heads, **overrides}
        return tiny_model(model_type, seed=seed, text_config=text)
    return tiny_model(model_type, seed=seed, **{**heads, **overrides})


def masked_like(model_type: str, keep: list[HeadKeep | None]):
    """The dense model with the output-projection columns of every head outside `keep` zeroed:
    the functional definition of removing those heads."""
    model = gqa_model(model_type)
    adapter = adapter_for(model.config)
    for layer, shape, kept in zip(
        decoder_layers(model), head_shapes(model.config), keep, strict=True
    ):
        if kept is None:
            continue
        weights = head_weights(layer, adapter, shape)
        with torch.no_grad():
            for head in range(shape.num_heads):
                if head not in kept.query.tolist():
                    weights.output[head].zero_()  # a view of the output projection's weight
    return model


WITHIN_GROUPS = HeadKeep(torch.tensor([0, 1]), torch.tensor([1, 2]))  # one query head per group
ONE_GROUP = HeadKeep(torch.tensor([1]), torch.tensor([2, 3]))  # KV group 1 with both its heads


# ----- layouts: every adapter's row map matches what its forward pass does ---------------------


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_head_weights_have_head_first_shapes_for_every_adapter(model_type: str) -> None:
    model = gqa_model(model_type)
    adapter = adapter_for(model.config)
    shape = head_shapes(model.config)[0]
    weights = head_weights(decoder_layers(model)[0], adapter, shape)
    hidden = model.config.get_text_config().hidden_size
    assert len(weights.query) == len(weights.output) == shape.num_heads == 4
    assert len(weights.key) == len(weights.value) == shape.num_kv_heads
    for block in (*weights.query, *weights.key, *weights.value):
        assert block.shape == (shape.head_dim, hidden)
    for block in weights.output:
        assert block.shape == (hidden, shape.head_dim)


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [(t, {}) for t in ALL_MODEL_TYPES if t != "falcon"]
    + [("falcon", layout) for layout in FALCON_LAYOUTS.values()],
)
def test_zeroing_the_value_rows_the_layout_names_silences_exactly_that_group(
    model_type: str, overrides: dict
) -> None:
    """Checks the fused/interleaved row maps against the model's own forward pass: if the map
    names the wrong rows as KV head 1's values, other heads go quiet or group 1 does not."""
    from prunenet.analysis.head_scores import output_energy_scores
    from tests.conftest import sample_input_ids

    model = gqa_model(model_type, **overrides) if overrides else gqa_model(model_type)
    attention = adapter_for(model.config).attention
    shape = head_shapes(model.config)[0]
    silenced = shape.num_kv_heads - 1
    projections, _ = attention_modules(decoder_layers(model)[0], adapter_for(model.config))
    with torch.no_grad():
        for module, (roles, heads) in zip(
            projections, qkv_row_heads(attention, shape), strict=True
        ):
            rows = ((roles == 2) & (heads == silenced)).nonzero().flatten()
            if attention.conv1d:
                module.weight[:, rows] = 0.0
            else:
                module.weight[rows] = 0.0
            if getattr(module, "bias", None) is not None:
                module.bias[rows] = 0.0
    energy = output_energy_scores(model, sample_input_ids())[0].query
    group = torch.arange(shape.num_heads) // shape.group_size
    assert torch.all(energy[group == silenced] < 1e-10)
    assert torch.all(energy[group != silenced] > 1e-4)


# ----- the cut computes what zeroing the removed heads computes ----------------------------------


@pytest.mark.parametrize("model_type", REMOVABLE)
@pytest.mark.parametrize(
    "keep",
    [[WITHIN_GROUPS, WITHIN_GROUPS], [ONE_GROUP, ONE_GROUP], [None, ONE_GROUP]],
    ids=["within-groups", "kv-group", "per-layer"],
)
def test_pruned_model_computes_what_zeroing_the_removed_heads_computes(
    model_type: str, keep: list
) -> None:
    pruned = gqa_model(model_type)
    prune_heads(pruned, keep)
    masked = masked_like(model_type, keep)
    assert not torch.allclose(logits_of(masked), logits_of(gqa_model(model_type)), atol=1e-3)
    torch.testing.assert_close(logits_of(pruned), logits_of(masked), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", REMOVABLE)
def test_eager_attention_computes_the_same_after_the_cut(model_type: str) -> None:
    """Eager attention expands KV heads by the module's cached `num_key_value_groups` (SDPA
    infers it from the shapes), so a stale count only shows here."""
    keep = [WITHIN_GROUPS, ONE_GROUP]
    pruned, masked = gqa_model(model_type), masked_like(model_type, keep)
    pruned.set_attn_implementation("eager")
    masked.set_attn_implementation("eager")
    prune_heads(pruned, keep)
    torch.testing.assert_close(logits_of(pruned), logits_of(masked), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", REMOVABLE)
@pytest.mark.parametrize("keep", [WITHIN_GROUPS, ONE_GROUP], ids=["within-groups", "kv-group"])
def test_uniform_head_removal_reloads_plainly_with_identical_logits(
    model_type: str, keep: HeadKeep, tmp_path: Path
) -> None:
    pruned = gqa_model(model_type)
    prune_heads(pruned, [keep, keep])
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert head_shapes(reloaded.config) == head_shapes(pruned.config)
    assert torch.equal(logits_of(reloaded), logits_of(pruned))


@pytest.mark.parametrize("model_type", REMOVABLE)
def test_uniform_counts_go_to_the_global_fields_with_an_explicit_head_dim(model_type: str) -> None:
    model = gqa_model(model_type)
    head_dim = head_shapes(model.config)[0].head_dim
    prune_heads(model, [ONE_GROUP, ONE_GROUP])
    text = model.config.get_text_config()
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (2, 1, head_dim)
    assert not getattr(text, "is_heterogeneous", False)


# ----- grouping, parameters ---------------------------------------------------------------------


@pytest.mark.parametrize("model_type", REMOVABLE)
def test_grouping_stays_valid_in_config_modules_and_weights(model_type: str) -> None:
    model = gqa_model(model_type)
    prune_heads(model, [WITHIN_GROUPS, ONE_GROUP])
    adapter = adapter_for(model.config)
    for layer, shape in zip(decoder_layers(model), head_shapes(model.config), strict=True):
        assert shape.num_heads % shape.num_kv_heads == 0
        module = layer.get_submodule(adapter.attention.module)
        assert module.num_key_value_groups == shape.group_size
        weights = head_weights(layer, adapter, shape)  # raises if rows and counts disagree
        assert len(weights.value) == shape.num_kv_heads
        projections, output = attention_modules(layer, adapter)
        rows = sum(m.weight.shape[0] for m in projections)
        assert rows == (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
        assert output.in_features == shape.num_heads * shape.head_dim
    assert [(s.num_heads, s.num_kv_heads) for s in head_shapes(model.config)] == [(2, 2), (2, 1)]


@pytest.mark.parametrize("model_type", REMOVABLE)
def test_parameters_removed_are_the_removed_heads_costs(model_type: str) -> None:
    model = gqa_model(model_type)
    adapter = adapter_for(model.config)
    layers = decoder_layers(model)
    shape = head_shapes(model.config)[0]
    costs = head_costs(layers[0], adapter, shape)
    attention_before = attention_parameters(layers[0], adapter)
    report = prune_heads(model, [WITHIN_GROUPS, ONE_GROUP])
    # Layer 0 loses 2 query heads; layer 1 loses KV group 0 and its 2 query heads.
    removed = 2 * costs.per_query_head + (costs.per_kv_head + 2 * costs.per_query_head)
    assert report.params_before - report.params_after == removed
    assert attention_parameters(layers[0], adapter) == attention_before - 2 * costs.per_query_head
    hidden = model.config.get_text_config().hidden_size
    assert costs.per_query_head >= 2 * shape.head_dim * hidden  # its q rows and o columns
    assert costs.per_kv_head >= 2 * shape.head_dim * hidden  # its k and v rows


# ----- selection --------------------------------------------------------------------------------


def test_select_heads_keeps_the_best_groups_and_the_best_heads_within_them() -> None:
    shape = head_shapes(gqa_model("llama").config)[0]  # 4 heads, 2 groups
    scores = torch.tensor([0.1, 0.2, 5.0, 0.3])  # group 1 sums higher; within it head 2 wins
    best = select_heads(scores, shape, num_kv_heads=1, heads_per_group=1)
    assert _same(best, HeadKeep(torch.tensor([1]), torch.tensor([2])))
    kept = select_heads(scores, shape, num_kv_heads=2, heads_per_group=1)
    assert _same(kept, HeadKeep(torch.tensor([0, 1]), torch.tensor([1, 2])))


def test_keep_first_narrows_to_the_leading_groups_and_heads() -> None:
    shape = head_shapes(gqa_model("llama").config)[0]
    assert _same(keep_first(shape, 2, 2), HeadKeep(torch.tensor([0, 1]), torch.tensor([0, 2])))


def _same(a: HeadKeep, b: HeadKeep) -> bool:
    return torch.equal(a.kv, b.kv) and torch.equal(a.query, b.query)


# ----- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (HeadKeep(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)), "every"),
        (HeadKeep(torch.tensor([0, 1]), torch.tensor([0, 1, 2])), "same number in every"),
        (HeadKeep(torch.tensor([0]), torch.tensor([0, 2])), "KV heads that are removed"),
        (HeadKeep(torch.tensor([0, 1]), torch.tensor([0, 7])), "outside 0..3"),
        (HeadKeep(torch.tensor([0, 0]), torch.tensor([0, 1])), "repeat"),
    ],
    ids=["every-head", "unequal-groups", "orphan-query", "out-of-range", "repeated"],
)
def test_invalid_selections_are_refused_before_any_cut(keep: HeadKeep, message: str) -> None:
    model = gqa_model("qwen2")
    before = logits_of(model)
    with pytest.raises(PruneNetError, match=message):
        prune_heads(model, [WITHIN_GROUPS, keep])
    assert torch.equal(logits_of(model), before)  # layer 0 was not cut either
    assert head_shapes(model.config)[0].num_heads == 4


def test_counts_the_config_validator_rejects_are_refused_before_any_cut() -> None:
    """Llama's config requires hidden_size % num_attention_heads == 0 (16 % 3 != 0)."""
    model = gqa_model("llama", num_key_value_heads=4)  # 4 groups of one head
    before = logits_of(model)
    three = HeadKeep(torch.tensor([0, 1, 3]), torch.tensor([0, 1, 3]))
    with pytest.raises(PruneNetError, match="not a multiple"):
        prune_heads(model, [three, three])
    assert torch.equal(logits_of(model), before)


@pytest.mark.parametrize("model_type", REMOVABLE + DERIVED_HEAD_SIZE)
def test_every_adapter_can_lose_heads_in_its_tiny_configuration(model_type: str) -> None:
    assert head_removal_blocker(gqa_model(model_type).config) is None


def test_falcon_with_alibi_refuses_head_removal_naming_the_reason() -> None:
    """Falcon's ALiBi biases are built per head position from the config's head count, at the
    model level: the kept heads would get the removed heads' slopes."""
    model = gqa_model("falcon", alibi=True)
    before = logits_of(model)
    keep = HeadKeep(torch.tensor([0]), torch.tensor([2, 3]))
    assert head_removal_blocker(model.config).startswith("falcon with alibi: its ALiBi")
    with pytest.raises(PruneNetError, match="falcon with alibi"):
        prune_heads(model, [keep, keep])
    assert torch.equal(logits_of(model), before)


def test_a_keep_list_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(PruneNetError, match="2 layers"):
        prune_heads(gqa_model("mistral"), [WITHIN_GROUPS])


def test_cut_heads_checks_the_grouping_too() -> None:
    model = gqa_model("mistral")
    layer, shape = decoder_layers(model)[0], head_shapes(model.config)[0]
    with pytest.raises(PruneNetError, match="same number"):
        cut_heads(layer, adapter_for(model.config), shape, (torch.tensor([0, 1]), [0, 1, 3]))
