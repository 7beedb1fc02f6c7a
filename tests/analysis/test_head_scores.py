"""Data-free head scores: a head that writes nothing scores zero and ranks lowest, for every
architecture; KV groups score the sum of their query heads; the first token is left out."""

from __future__ import annotations

import pytest
import torch

from prunenet.analysis.head_scores import (
    layer_weight_scores,
    output_energy_scores,
    weight_scores,
)
from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.config_fields import head_shapes
from prunenet.core.surgery import attention_modules
from prunenet.core.surgery import head_weights as arch_head_weights
from prunenet.errors import PruneNetError
from tests.conftest import ALL_MODEL_TYPES, SMALL_SELFGEN, sample_input_ids
from tests.core.test_heads import gqa_model

SILENT_HEAD = 1


def with_silent_head(model_type: str):
    """A 4-head tiny model whose head 1 has its output-projection columns zeroed in layer 0."""
    model = gqa_model(model_type)
    shape = head_shapes(model.config)[0]
    weights = arch_head_weights(decoder_layers(model)[0], adapter_for(model.config), shape)
    with torch.no_grad():
        weights.output[SILENT_HEAD].zero_()  # a view of the output projection's weight
    return model


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_a_head_with_zeroed_output_columns_scores_zero_and_ranks_lowest(model_type: str) -> None:
    scores = output_energy_scores(with_silent_head(model_type), sample_input_ids())[0].query
    assert scores[SILENT_HEAD] == 0.0
    assert int(scores.argmin()) == SILENT_HEAD
    assert torch.all(scores[torch.arange(len(scores)) != SILENT_HEAD] > 0)


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_weights_only_score_of_a_silent_head_is_zero_and_lowest(model_type: str) -> None:
    scores = weight_scores(with_silent_head(model_type))[0].query
    assert scores[SILENT_HEAD] == 0.0
    assert int(scores.argmin()) == SILENT_HEAD
    assert torch.all(scores[torch.arange(len(scores)) != SILENT_HEAD] > 0)


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2"])
def test_weights_only_score_is_the_norm_of_the_output_value_product(model_type: str) -> None:
    model = gqa_model(model_type)
    adapter = adapter_for(model.config)
    layer, shape = decoder_layers(model)[0], head_shapes(model.config)[0]
    weights = arch_head_weights(layer, adapter, shape)
    expected = torch.stack(
        [
            torch.linalg.matrix_norm(output @ weights.value[head // shape.group_size])
            for head, output in enumerate(weights.output)
        ]
    )
    torch.testing.assert_close(layer_weight_scores(layer, adapter, shape).query, expected)


@pytest.mark.parametrize("model_type", ["qwen2", "phi3"])
def test_kv_group_score_is_the_sum_of_its_query_heads(model_type: str) -> None:
    for layer_scores in output_energy_scores(gqa_model(model_type), sample_input_ids()):
        torch.testing.assert_close(layer_scores.kv, layer_scores.query.reshape(2, 2).sum(dim=1))


def test_energy_is_the_mean_over_every_token_but_the_first() -> None:
    model = gqa_model("llama")
    tokens = sample_input_ids()
    adapter = adapter_for(model.config)
    _, output = attention_modules(decoder_layers(model)[1], adapter)
    captured = []
    handle = output.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    inputs, size = captured[0], head_shapes(model.config)[1].head_dim
    later = inputs[:, 1:]  # the first position is excluded
    expected = torch.stack(
        [
            (later[..., h * size : (h + 1) * size] @ output.weight[:, h * size : (h + 1) * size].T)
            .square()
            .sum(dim=-1)
            .mean()
            for h in range(4)
        ]
    )
    scores = output_energy_scores(model, tokens)[1].query
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
    every = (inputs[..., :size] @ output.weight[:, :size].T).square().sum(dim=-1).mean()
    assert not torch.isclose(every, expected[0], rtol=1e-3)  # so including it would be noticed


def test_without_tokens_the_model_writes_its_own_text(no_disk_cache) -> None:
    scores = output_energy_scores(gqa_model("mistral"), selfgen=SMALL_SELFGEN)
    assert len(scores) == 2 and all(s.query.shape == (4,) for s in scores)
    assert all(torch.all(s.query > 0) for s in scores)


def test_one_token_sequences_are_refused() -> None:
    with pytest.raises(PruneNetError, match="length >= 2"):
        output_energy_scores(gqa_model("llama"), torch.tensor([[5], [6]]))
