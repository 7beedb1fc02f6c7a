"""Config fields: the FFN widths and head counts written into a config are what is read back,
per layer, and each writer keeps the other per-layer values."""

from __future__ import annotations

import pytest

from prunenet.core.config_fields import (
    ffn_width,
    ffn_widths,
    head_shapes,
    set_ffn_width,
    set_ffn_widths,
    set_head_counts,
)
from tests.conftest import ALL_MODEL_TYPES, tiny_config


def test_gpt2_width_defaults_to_four_times_hidden_when_n_inner_is_unset() -> None:
    config = tiny_config("gpt2", n_inner=None)
    assert ffn_width(config) == 4 * config.n_embd


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_set_ffn_width_is_what_ffn_width_reads_back(model_type: str) -> None:
    config = tiny_config(model_type)
    set_ffn_width(config, 7)
    assert ffn_width(config) == 7


def test_gemma3_width_lives_in_the_text_config() -> None:
    config = tiny_config("gemma3")
    set_ffn_width(config, 7)
    assert config.text_config.intermediate_size == 7


def test_set_ffn_widths_keeps_per_layer_head_counts() -> None:
    config = tiny_config("mistral", num_attention_heads=4, num_key_value_heads=2)
    set_head_counts(config, [(4, 2), (2, 1)])
    set_ffn_widths(config, [20, 12])
    assert [(s.num_heads, s.num_kv_heads) for s in head_shapes(config)] == [(4, 2), (2, 1)]
    assert ffn_widths(config) == [20, 12]
    set_ffn_widths(config, [9, 9])  # uniform widths: only the head overrides remain
    assert config.per_layer_config[1].num_attention_heads == 2
    assert set(config.per_layer_attributes) == {"num_attention_heads", "num_key_value_heads"}


def test_set_head_counts_keeps_per_layer_ffn_widths_and_uniform_counts_leave_no_override() -> None:
    config = tiny_config("qwen2", num_attention_heads=4, num_key_value_heads=2)
    set_ffn_widths(config, [20, 12])
    set_head_counts(config, [(2, 2), (2, 2)])
    assert ffn_widths(config) == [20, 12]
    assert set(config.per_layer_attributes) == {"intermediate_size"}
    assert (config.num_attention_heads, config.head_dim) == (2, 4)
    assert head_shapes(config)[1].head_dim == 4  # explicit, not 16 / 2


@pytest.mark.parametrize(
    ("model_type", "needs_global_access"), [("llama", True), ("mistral", False)]
)
def test_global_access_is_switched_on_only_where_the_config_validator_needs_it(
    model_type: str, needs_global_access: bool
) -> None:
    """Llama's validator reads num_attention_heads globally; Mistral's does not."""
    config = tiny_config(model_type, num_attention_heads=4, num_key_value_heads=2)
    set_head_counts(config, [(4, 2), (2, 1)])
    assert config.allow_global_per_layer_attribute_access is needs_global_access
    set_head_counts(config, [(2, 1), (2, 1)])  # homogeneous again: the switch goes too
    assert config.allow_global_per_layer_attribute_access is False
    assert "allow_global_per_layer_attribute_access" not in config.to_dict()
