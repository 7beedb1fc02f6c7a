"""Running a decoder layer's attention a few sequences at a time gives the layer's own output."""

from __future__ import annotations

import pytest
import torch

from prunenet.analysis.layer_calls import (
    by_sequences,
    capture_layer_inputs,
    replaced_forward,
    run_layer,
)
from prunenet.analysis.selfgen import SelfGenConfig, generate_own_text
from prunenet.analysis.sequential import SequentialCut, _output_room
from prunenet.analysis.shared import shared_analysis
from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.config_fields import ffn_widths
from prunenet.core.surgery import attention_block
from prunenet.errors import PruneNetError
from tests.conftest import ALL_MODEL_TYPES, tiny_config, tiny_model

WITH_ATTENTION = [t for t in ALL_MODEL_TYPES if adapter_for(tiny_config(t)).attention]


@pytest.mark.parametrize("model_type", WITH_ATTENTION)
def test_a_layer_with_its_attention_run_in_chunks_of_sequences_gives_the_same_output(
    model_type: str,
) -> None:
    model = tiny_model(model_type)
    tokens = generate_own_text(model, SelfGenConfig(sequences=5, length=12, seed=1))
    hidden, arguments = capture_layer_inputs(model, tokens)
    layer = decoder_layers(model)[0]
    attention = attention_block(layer, adapter_for(model.config))
    calls = []
    attention.register_forward_pre_hook(lambda module, args: calls.append(1))
    whole = run_layer(layer, hidden, arguments[0])
    assert len(calls) == 1
    with replaced_forward(attention, by_sequences(attention.forward, 5, 2)):
        chunked = run_layer(layer, hidden, arguments[0])
    assert len(calls) == 2  # the hooks see one call: the chunks are inside it
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_only_arguments_that_hold_the_sequences_are_sliced() -> None:
    seen = []

    def forward(hidden_states, shared, mask, offset=0):
        seen.append((hidden_states.shape[0], shared.shape[0], mask.shape[0], offset))
        return hidden_states * 2 + offset, None

    chunked = by_sequences(forward, sequences=5, chunk=2)
    hidden = torch.arange(5 * 3 * 4.0).reshape(5, 3, 4)
    out, weights = chunked(hidden, torch.ones(1, 3, 4), mask=torch.zeros(5, 1, 3, 3), offset=1)
    assert torch.equal(out, hidden * 2 + 1) and weights is None
    assert seen == [(2, 1, 2, 1), (2, 1, 2, 1), (1, 1, 1, 1)]
    seen.clear()
    chunked(hidden[:4], torch.ones(1, 3, 4), mask=torch.zeros(4, 1, 3, 3))
    assert seen == [(4, 1, 4, 0)]  # another batch size passes through whole


def test_an_output_that_cannot_be_joined_is_refused() -> None:
    chunked = by_sequences(lambda hidden_states: {"out": hidden_states}, sequences=4, chunk=2)
    with pytest.raises(PruneNetError, match="dict"):
        chunked(torch.zeros(4, 2, 3))


def test_the_sequential_cut_runs_attention_in_chunks_of_whole_sequences(monkeypatch) -> None:
    # 8 sequences of 32 tokens, 70 rows per attention call: two sequences per call.
    monkeypatch.setattr("prunenet.analysis.layer_calls.ATTENTION_ROWS", 70)
    model = tiny_model("llama")
    cut = SequentialCut(model, "lsq", generate_own_text(model, SelfGenConfig(8, 32, 0)))
    layer = decoder_layers(model)[0]
    sizes = []
    own = type(attention_block(layer, cut.adapter)).forward

    def counting(self, hidden_states, *args, **kwargs):
        sizes.append(hidden_states.shape[0])
        return own(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(type(attention_block(layer, cut.adapter)), "forward", counting)
    cut(0, layer, torch.rand(ffn_widths(model.config)[0]), 4)
    assert sizes == [2, 2, 2, 2]


def test_the_cut_output_shares_the_activations_memory_only_where_it_fits() -> None:
    acts = torch.randn(6, 10, 8)
    room = _output_room(acts, 5)
    assert room.shape == (60, 5) and room.data_ptr() == acts.data_ptr()
    wider = _output_room(acts, 9)  # a model wider than its FFN: new memory
    assert wider.shape == (60, 9) and wider.data_ptr() != acts.data_ptr()
    strided = _output_room(acts.transpose(0, 1), 5)
    assert strided.data_ptr() != acts.data_ptr()


def test_the_shared_analysis_runs_attention_in_chunks_with_the_same_result(monkeypatch) -> None:
    model = tiny_model("llama")
    tokens = generate_own_text(model, SelfGenConfig(8, 32, 0))
    whole = shared_analysis(model, tokens, "lsq")
    monkeypatch.setattr("prunenet.analysis.layer_calls.ATTENTION_ROWS", 70)
    sizes = []
    attention = type(attention_block(decoder_layers(model)[0], adapter_for(model.config)))
    own = attention.forward

    def counting(self, hidden_states, *args, **kwargs):
        sizes.append(hidden_states.shape[0])
        return own(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(attention, "forward", counting)
    chunked = shared_analysis(model, tokens, "lsq")
    assert sizes == [2] * 4 * len(decoder_layers(model))
    for dense, again in zip(whole.layers, chunked.layers, strict=True):
        torch.testing.assert_close(again.activations.rms, dense.activations.rms)
