"""Depth pruning: dropping whole decoder layers computes the dense model with those layers
skipped, generates with a KV cache, and reloads with identical logits for every architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from prunenet import load_pruned
from prunenet.core.arch import _config_owner, adapter_for, decoder_layers
from prunenet.core.compress import count_parameters, prune_model
from prunenet.core.config_fields import ffn_widths
from prunenet.core.depth import drop_layers, layer_parameters
from prunenet.errors import PruneNetError
from tests.conftest import (
    ALL_MODEL_TYPES,
    FFN_WIDTH,
    TINY_CONFIGS,
    logits_of,
    sample_input_ids,
    tiny_model,
)

LAYERS = 4
SLIDING, FULL = "sliding_attention", "full_attention"
# Mixed attention types with a window shorter than the test sequences (12 tokens), so a layer
# built with the wrong type computes something else and the logits show it.
MIXED_TYPES = [SLIDING, FULL, SLIDING, FULL]
LAYER_TYPE_OVERRIDES = {
    "gemma2": {"layer_types": MIXED_TYPES, "sliding_window": 4},
    "gemma3_text": {"layer_types": MIXED_TYPES, "sliding_window": 4},
    # Qwen derives layer_types from max_window_layers: layers 0-1 full, 2-3 sliding.
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2},
    "qwen3": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2},
}


def deep_tiny_model(model_type: str, **overrides) -> nn.Module:
    """A four-layer tiny model (the conftest ones have two, too few to drop a middle layer)."""
    if model_type == "gemma3":
        text = {**TINY_CONFIGS["gemma3"]["text_config"], "num_hidden_layers": LAYERS}
        text.update(LAYER_TYPE_OVERRIDES["gemma3_text"])
        return tiny_model(model_type, text_config=text, **overrides)
    layer_count = {"n_layer": LAYERS} if model_type == "gpt2" else {"num_hidden_layers": LAYERS}
    return tiny_model(
        model_type, **layer_count, **LAYER_TYPE_OVERRIDES.get(model_type, {}), **overrides
    )


def text_config(model: nn.Module):
    """The config object that owns the layer count (Gemma 3 multimodal: its text config)."""
    return _config_owner(model.config, adapter_for(model.config).width_field)[0]


@torch.no_grad()
def logits_skipping(model: nn.Module, skipped: list[int]) -> torch.Tensor:
    """The dense model's logits with layers `skipped` passing their input on unchanged."""

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    layers = decoder_layers(model)
    handles = [layers[i].register_forward_hook(identity, with_kwargs=True) for i in skipped]
    try:
        return logits_of(model)
    finally:
        for handle in handles:
            handle.remove()


def greedy(model: nn.Module, use_cache: bool = True) -> torch.Tensor:
    prompt = sample_input_ids(length=5)
    with torch.no_grad():
        return model.generate(
            prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=use_cache
        )


def saved_and_reloaded(model: nn.Module, folder: Path) -> nn.Module:
    model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


# ----- what the pruned model computes ------------------------------------------------------------


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_dropping_a_middle_layer_equals_skipping_it_in_the_dense_model(model_type: str) -> None:
    model = deep_tiny_model(model_type)
    expected = logits_skipping(model, [1])
    assert not torch.allclose(expected, logits_of(model))  # the layer mattered
    drop_layers(model, [1])
    assert len(decoder_layers(model)) == LAYERS - 1
    torch.testing.assert_close(logits_of(model), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_model_without_a_middle_layer_reloads_plainly_with_identical_logits(
    model_type: str, tmp_path: Path
) -> None:
    model = deep_tiny_model(model_type)
    drop_layers(model, [1])
    reloaded = saved_and_reloaded(model, tmp_path / "out")
    assert text_config(reloaded).num_hidden_layers == LAYERS - 1
    assert len(decoder_layers(reloaded)) == LAYERS - 1
    assert torch.equal(logits_of(reloaded), logits_of(model))


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_kept_layers_are_renumbered_to_their_new_positions(model_type: str) -> None:
    model = deep_tiny_model(model_type)
    drop_layers(model, [0, 2])
    positions = {
        (position, module.layer_idx)
        for position, layer in enumerate(decoder_layers(model))
        for module in layer.modules()
        if getattr(module, "layer_idx", None) is not None
    }
    assert positions == {(0, 0), (1, 1)}


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_generation_with_a_kv_cache_works_after_dropping(model_type: str, tmp_path: Path) -> None:
    model = deep_tiny_model(model_type)
    drop_layers(model, [1])
    with_cache = greedy(model)
    assert with_cache.shape == (2, 5 + 3)
    # The cache only matters if every layer writes its own slot: the cache-free run is the truth.
    assert torch.equal(with_cache, greedy(model, use_cache=False))
    assert torch.equal(greedy(saved_and_reloaded(model, tmp_path / "out")), with_cache)


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_parameters_shrink_by_the_dropped_layers_parameters(model_type: str) -> None:
    model = deep_tiny_model(model_type)
    before = count_parameters(model)
    removed = layer_parameters(model, 1) + layer_parameters(model, 3)
    assert removed > 0
    drop_layers(model, [3, 1])
    assert count_parameters(model) == before - removed


def test_layer_parameters_counts_every_weight_of_one_llama_layer() -> None:
    model = deep_tiny_model("llama")
    hidden, kv = 16, 8  # 2 heads of 8; one key/value head
    attention = hidden * hidden * 2 + hidden * kv * 2  # q, o + k, v
    ffn = 3 * hidden * FFN_WIDTH
    assert layer_parameters(model, 2) == attention + ffn + 2 * hidden  # + two RMSNorms


# ----- per-layer config ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "gemma3"])
def test_gemma_layer_types_are_sliced_with_the_layers(model_type: str, tmp_path: Path) -> None:
    model = deep_tiny_model(model_type)
    drop_layers(model, [1])
    assert text_config(model).layer_types == [SLIDING, SLIDING, FULL]
    reloaded = saved_and_reloaded(model, tmp_path / "out")
    assert text_config(reloaded).layer_types == [SLIDING, SLIDING, FULL]
    attention_types = [layer.self_attn.layer_type for layer in decoder_layers(reloaded)]
    assert attention_types == [SLIDING, SLIDING, FULL]


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_max_window_layers_still_describes_the_sliced_layer_types(model_type: str) -> None:
    model = deep_tiny_model(model_type)
    assert model.config.layer_types == [FULL, FULL, SLIDING, SLIDING]
    drop_layers(model, [1])
    assert model.config.layer_types == [FULL, SLIDING, SLIDING]
    assert model.config.max_window_layers == 1
    # A config rebuilt from max_window_layers alone derives the same layer types.
    data = {k: v for k, v in model.config.to_dict().items() if k != "layer_types"}
    assert AutoConfig.for_model(**data).layer_types == model.config.layer_types


def test_qwen_dropping_every_sliding_layer_clears_the_models_sliding_flag(tmp_path: Path) -> None:
    model = deep_tiny_model("qwen2")
    drop_layers(model, [2, 3])
    assert model.model.has_sliding_layers is False
    assert saved_and_reloaded(model, tmp_path / "out").model.has_sliding_layers is False


def pruned_unevenly(widths: list[int]) -> nn.Module:
    """A four-layer tiny Llama whose FFN layers were cut to `widths` by random scores."""
    model = deep_tiny_model("llama")
    generator = torch.Generator().manual_seed(5)
    scores = [torch.rand(FFN_WIDTH, generator=generator) for _ in range(LAYERS)]
    prune_model(model, scores, widths)
    assert ffn_widths(model.config) == widths
    return model


def test_per_layer_ffn_widths_are_reindexed_and_reload_through_load_pruned(tmp_path: Path) -> None:
    model = pruned_unevenly([21, 24, 15, 18])  # the widest layer is the one dropped
    expected = logits_skipping(model, [1])
    drop_layers(model, [1])
    assert ffn_widths(model.config) == [21, 15, 18]
    assert model.config.to_dict()["intermediate_size"] == 21  # the widest kept layer
    assert model.config.is_heterogeneous
    torch.testing.assert_close(logits_of(model), expected, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path / "out")
    reloaded = load_pruned(tmp_path / "out")
    assert ffn_widths(reloaded.config) == [21, 15, 18]
    assert torch.equal(logits_of(reloaded), logits_of(model))


def test_dropping_the_only_narrower_layer_leaves_a_uniform_plain_config(tmp_path: Path) -> None:
    model = pruned_unevenly([20, 13, 20, 20])
    drop_layers(model, [1])
    assert ffn_widths(model.config) == [20, 20, 20]
    assert not getattr(model.config, "is_heterogeneous", False)
    reloaded = saved_and_reloaded(model, tmp_path / "out")
    assert torch.equal(logits_of(reloaded), logits_of(model))


def test_other_per_layer_overrides_move_with_their_layers() -> None:
    # Config only: attention-head overrides (as head pruning may write) are not built by the
    # 5.24 Llama modules, so no forward pass here.
    model = deep_tiny_model("llama")
    model.config.per_layer_config = {
        1: {"num_key_value_heads": 2},
        3: {"num_key_value_heads": 2, "intermediate_size": 20},
    }
    drop_layers(model, [1])
    assert model.config.to_dict()["per_layer_config"] == {
        "2": {"num_key_value_heads": 2, "intermediate_size": 20}
    }
    assert ffn_widths(model.config) == [FFN_WIDTH, FFN_WIDTH, 20]


# ----- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ([4], "numbered 0..3"),
        ([-1], "numbered 0..3"),
        ([1, 1], r"\[1\] are listed more than once"),
        ([0, 1, 2, 3], "keep at least one"),
        ([1.0], "not a whole number"),
        (["1"], "not a whole number"),
        ([True], "not a whole number"),
    ],
    ids=["past-the-end", "negative", "duplicate", "all", "float", "string", "bool"],
)
def test_bad_layer_lists_are_refused_and_leave_the_model_untouched(drop, message: str) -> None:
    model = deep_tiny_model("gemma2")
    before = logits_of(model)
    with pytest.raises(PruneNetError, match=message):
        drop_layers(model, drop)
    assert len(decoder_layers(model)) == LAYERS
    assert model.config.num_hidden_layers == LAYERS
    assert model.config.layer_types == MIXED_TYPES
    assert torch.equal(logits_of(model), before)


def test_an_empty_drop_list_changes_nothing() -> None:
    model = deep_tiny_model("llama")
    layers = decoder_layers(model)
    drop_layers(model, [])
    assert decoder_layers(model) == layers
    assert model.config.num_hidden_layers == LAYERS


def test_tensor_indices_are_accepted() -> None:
    model = deep_tiny_model("llama")
    drop_layers(model, torch.tensor([2]))
    assert model.config.num_hidden_layers == LAYERS - 1


def test_layer_parameters_refuses_an_index_out_of_range() -> None:
    with pytest.raises(PruneNetError, match="numbered 0..3"):
        layer_parameters(deep_tiny_model("llama"), 4)


def test_gpt2_with_position_scaled_attention_refuses_to_move_layers() -> None:
    model = deep_tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(PruneNetError, match="scale_attn_by_inverse_layer_idx"):
        drop_layers(model, [1])
    assert len(decoder_layers(model)) == LAYERS


def test_gpt2_with_position_scaled_attention_may_drop_its_last_layers(tmp_path: Path) -> None:
    model = deep_tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True)
    expected = logits_skipping(model, [3])
    drop_layers(model, [3])
    torch.testing.assert_close(logits_of(model), expected, rtol=0, atol=1e-6)
    assert torch.equal(logits_of(saved_and_reloaded(model, tmp_path / "out")), logits_of(model))
