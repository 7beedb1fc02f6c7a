"""Architecture adapters: every supported model type finds its FFN, and cut_ffn removes the
intended neurons (weights, biases, shapes and the function the layer computes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunenet.core.arch import (
    ADAPTERS,
    Adapter,
    adapter_for,
    attention_modules,
    can_store_output_bias,
    cut_ffn,
    decoder_layers,
    enable_output_biases,
    ffn_modules,
    ffn_weights,
    ffn_width,
    ffn_widths,
    head_shapes,
    set_ffn_width,
    set_ffn_widths,
    set_head_counts,
    supported_model_types,
)
from prunenet.errors import PruneNetError
from tests.conftest import (
    ALL_MODEL_TYPES,
    HIDDEN_SIZE,
    NUM_LAYERS,
    TINY_CONFIGS,
    logits_of,
    tiny_config,
    tiny_model,
)


def _input_biases(layer: torch.nn.Module, adapter: Adapter) -> list[torch.Tensor | None]:
    """Neuron-first biases of the FFN input projections (None where a projection has none)."""
    biases = [getattr(m, "bias", None) for m in ffn_modules(layer, adapter)[0]]
    if adapter.layout == "fused_gate_up" and biases[0] is not None:
        return list(biases[0].detach().chunk(2))
    return [b.detach().clone() if b is not None else None for b in biases]


def _keep_for_layer(width: int, layer_index: int) -> torch.Tensor:
    """A different sorted subset of half the neurons for each layer."""
    generator = torch.Generator().manual_seed(100 + layer_index)
    return torch.randperm(width, generator=generator)[: width // 2].sort().values


def test_every_adapter_has_a_tiny_test_config() -> None:
    assert set(TINY_CONFIGS) == set(ADAPTERS)


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_tiny_model_reports_the_adapters_model_type(model_type: str) -> None:
    assert tiny_model(model_type).config.model_type == model_type


def test_unknown_model_type_error_lists_the_supported_types() -> None:
    config = tiny_config("llama")
    config.model_type = "not-a-real-architecture"
    with pytest.raises(PruneNetError, match="not-a-real-architecture") as error:
        adapter_for(config)
    for model_type in supported_model_types():
        assert model_type in str(error.value)


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_adapter_finds_every_decoder_layers_ffn_with_neuron_first_shapes(model_type: str) -> None:
    model = tiny_model(model_type)
    adapter = adapter_for(model.config)
    width = ffn_width(model.config)
    layers = decoder_layers(model)
    assert len(layers) == NUM_LAYERS
    for layer in layers:
        ffn = ffn_weights(layer, adapter)
        assert ffn.width == width
        assert ffn.output.shape == (HIDDEN_SIZE, width)
        assert [tuple(w.shape) for w in ffn.inputs] == [(width, HIDDEN_SIZE)] * len(ffn.inputs)


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


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_cut_ffn_keeps_exactly_the_original_rows_at_keep_indices(model_type: str) -> None:
    model = tiny_model(model_type)
    adapter = adapter_for(model.config)
    width = ffn_width(model.config)
    for index, layer in enumerate(decoder_layers(model)):
        before = ffn_weights(layer, adapter)
        before_inputs = [w.clone() for w in before.inputs]
        before_output = before.output.clone()
        before_biases = _input_biases(layer, adapter)
        keep = _keep_for_layer(width, index)

        cut_ffn(layer, adapter, keep)

        after = ffn_weights(layer, adapter)
        assert len(after.inputs) == len(before_inputs)
        for cut, original in zip(after.inputs, before_inputs, strict=True):
            assert torch.equal(cut, original[keep])
        assert torch.equal(after.output, before_output[:, keep])
        for cut, original in zip(_input_biases(layer, adapter), before_biases, strict=True):
            assert (cut is None) == (original is None)
            if original is not None:
                assert torch.equal(cut, original[keep])


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_cut_model_computes_what_masking_the_removed_neurons_computes(model_type: str) -> None:
    """Removing neuron i is the same function as zeroing its output-projection column.

    This checks the cut through the model's own forward pass, so it fails if a layout keeps
    input rows and output columns of different neurons, or mis-cuts a bias.
    """
    pruned, masked = tiny_model(model_type), tiny_model(model_type)
    adapter = adapter_for(pruned.config)
    width = ffn_width(pruned.config)
    pairs = zip(decoder_layers(pruned), decoder_layers(masked), strict=True)
    for index, (pruned_layer, masked_layer) in enumerate(pairs):
        keep = _keep_for_layer(width, index)
        removed = torch.ones(width, dtype=torch.bool)
        removed[keep] = False
        cut_ffn(pruned_layer, adapter, keep)
        with torch.no_grad():
            ffn_weights(masked_layer, adapter).output[:, removed] = 0.0  # a view of the weight

    masked_logits = logits_of(masked)
    assert not torch.allclose(masked_logits, logits_of(tiny_model(model_type)), atol=1e-3)
    torch.testing.assert_close(logits_of(pruned), masked_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_cut_ffn_keeps_module_shape_attributes_truthful(model_type: str) -> None:
    model = tiny_model(model_type)
    adapter = adapter_for(model.config)
    layer = decoder_layers(model)[0]
    cut_ffn(layer, adapter, _keep_for_layer(ffn_width(model.config), 0))
    inputs, output = ffn_modules(layer, adapter)
    for module in [*inputs, output]:
        if isinstance(module, torch.nn.Linear):
            assert (module.out_features, module.in_features) == tuple(module.weight.shape)
        else:  # transformers' Conv1D stores (nx, nf)
            assert (module.nx, module.nf) == tuple(module.weight.shape)


def architecture_table_rows() -> list[str]:
    """The README's supported-architectures table, one Markdown row per adapter."""
    rows = []
    for model_type, adapter in sorted(ADAPTERS.items()):
        width = f"`{adapter.width_field}`"
        if adapter.default_width is not None:
            width += f" (unset: {adapter.default_width} x hidden)"
        cells = [
            f"`{model_type}`",
            f"`{adapter.layers}`",
            ", ".join(f"`{path}`" for path in adapter.inputs),
            f"`{adapter.output}`",
            width,
            adapter.layout,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def test_readme_lists_every_adapter_as_the_code_defines_it() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = [row for row in architecture_table_rows() if row not in readme]
    assert not missing, "README architecture table is out of date; regenerate with:\n" + "\n".join(
        architecture_table_rows()
    )


# ----- output biases (where a refit's intercept can live) ---------------------------------------


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_output_bias_support_matches_what_the_modeling_code_builds(model_type: str) -> None:
    model = tiny_model(model_type)
    adapter = adapter_for(model.config)
    _, output = ffn_modules(decoder_layers(model)[0], adapter)
    has_bias = getattr(output, "bias", None) is not None
    if adapter.output_bias == "switchable":
        # The flag is off by default: no bias yet, but one can be switched on.
        assert not has_bias and can_store_output_bias(model.config)
    else:
        assert has_bias == can_store_output_bias(model.config)


def test_switching_llama_output_biases_on_keeps_logits_and_reloads_with_them(
    tmp_path: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    before = logits_of(model)
    enable_output_biases(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.mlp_bias is True
    torch.testing.assert_close(logits_of(reloaded), before)


def test_switching_output_biases_on_is_refused_where_none_can_be_stored() -> None:
    with pytest.raises(PruneNetError, match="cannot store an FFN output bias"):
        enable_output_biases(tiny_model("qwen2"))


# ----- attention rows and per-layer values ------------------------------------------------------


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_every_adapter_knows_its_attention_heads_and_they_match_the_modules(
    model_type: str,
) -> None:
    model = tiny_model(model_type)
    adapter = adapter_for(model.config)
    assert adapter.attention is not None
    for layer, shape in zip(decoder_layers(model), head_shapes(model.config), strict=True):
        projections, output = attention_modules(layer, adapter)
        out_dim = 1 if adapter.attention.conv1d else 0  # Conv1D stores in x out
        rows = sum(m.weight.shape[out_dim] for m in projections)
        assert rows == (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
        assert output.weight.numel() == shape.num_heads * shape.head_dim * HIDDEN_SIZE


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
