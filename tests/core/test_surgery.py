"""Surgery: every supported model type's FFN is seen neuron-first, cut_ffn removes the intended
neurons (weights, biases, shapes and the function the layer computes), and output biases are
switched on only where they can be stored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunenet.core.arch import Adapter, adapter_for, decoder_layers
from prunenet.core.config_fields import ffn_width
from prunenet.core.surgery import cut_ffn, enable_output_biases, ffn_modules, ffn_weights
from prunenet.errors import PruneNetError
from tests.conftest import ALL_MODEL_TYPES, HIDDEN_SIZE, NUM_LAYERS, logits_of, tiny_model


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
