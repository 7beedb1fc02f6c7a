"""Layer-by-layer analysis: calling each decoder layer on captured inputs is the model's own
forward pass, and the sequential refit repairs every layer on tokens it did not fit on."""

from __future__ import annotations

import pytest
import torch

from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.analysis.sequential import SequentialRefit, capture_layer_inputs, run_layer
from prunenet.core.arch import decoder_layers, ffn_widths
from prunenet.core.compress import prune_model
from prunenet.core.ratios import uniform_keep
from prunenet.errors import PruneNetError
from tests.conftest import ALL_MODEL_TYPES, sample_input_ids, tiny_model

SELFGEN = SelfGenConfig(sequences=8, length=32, seed=0)


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_calling_the_first_layer_on_captured_inputs_gives_the_models_hidden_states(
    model_type: str,
) -> None:
    model = tiny_model(model_type)
    tokens = sample_input_ids()
    hidden, arguments = capture_layer_inputs(model, tokens)
    with torch.no_grad():
        expected = model(tokens, output_hidden_states=True, use_cache=False).hidden_states[1]
    after_first = run_layer(decoder_layers(model)[0], hidden, arguments[0])
    torch.testing.assert_close(after_first, expected)


def test_the_sequential_refit_lowers_every_layers_held_out_error() -> None:
    model = tiny_model("llama")
    widths = ffn_widths(model.config)
    refit = SequentialRefit(model, "lsq", SELFGEN)
    scores = [torch.rand(width, generator=torch.Generator().manual_seed(0)) for width in widths]
    prune_model(model, scores, uniform_keep(widths, 0.5), cut=refit)
    assert all(row["held_error_refit"] < row["held_error_cut"] for row in refit.log.layers)


def test_the_sequential_refit_refuses_layers_out_of_order() -> None:
    model = tiny_model("llama")
    refit = SequentialRefit(model, "lsq", SELFGEN)
    with pytest.raises(PruneNetError, match="in order"):
        refit(1, decoder_layers(model)[1], torch.arange(4))


def test_a_bias_refit_is_refused_where_no_output_bias_can_be_stored() -> None:
    with pytest.raises(PruneNetError, match="cannot store"):
        SequentialRefit(tiny_model("qwen2"), "bias", SELFGEN)
