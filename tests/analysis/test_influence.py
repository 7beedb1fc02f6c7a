"""Layer scores: Block Influence and skip-KL rank a layer that adds nothing to the residual
stream lowest, for every architecture, and agree with a direct computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunenet.analysis.influence import block_influence, skip_kl, skipping
from prunenet.core.arch import _get, adapter_for, decoder_layers
from prunenet.errors import PruneNetError
from tests.conftest import ALL_MODEL_TYPES, SMALL_SELFGEN, sample_input_ids
from tests.core.test_depth import LAYERS, deep_tiny_model

# Where each architecture's attention output projection lives in a decoder layer (read from the
# transformers 5.24 modeling files). With it and the FFN output projection zeroed, weights and
# biases, every residual branch adds exactly zero: the pre-norm blocks add the projections'
# outputs (Gemma 2/3 first RMS-normalise them, and a zero vector stays zero), and the parallel
# blocks (Phi, GPT-NeoX, Falcon) add their sum.
ATTENTION_OUTPUT = {
    **dict.fromkeys(
        ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3"],
        "self_attn.o_proj",
    ),
    "phi": "self_attn.dense",
    "opt": "self_attn.out_proj",
    "gpt2": "attn.c_proj",
    "gpt_neox": "attention.dense",
    "falcon": "self_attention.dense",
}
IDENTITY_LAYER = 2


def test_every_architecture_names_its_attention_output() -> None:
    assert set(ATTENTION_OUTPUT) == set(ALL_MODEL_TYPES)


def with_identity_layer(model_type: str, index: int = IDENTITY_LAYER) -> nn.Module:
    """A four-layer tiny model whose layer `index` passes its input on unchanged."""
    model = deep_tiny_model(model_type)
    layer = decoder_layers(model)[index]
    adapter = adapter_for(model.config)
    with torch.no_grad():
        for path in (ATTENTION_OUTPUT[model_type], adapter.output):
            module = _get(layer, path)
            module.weight.zero_()
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    return model


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_block_influence_gives_one_finite_score_per_layer_in_range(model_type: str) -> None:
    scores = block_influence(deep_tiny_model(model_type), sample_input_ids())
    assert scores.shape == (LAYERS,)
    assert torch.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 2)).all()


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_a_layer_that_adds_nothing_scores_zero_influence_and_ranks_lowest(model_type: str) -> None:
    model = with_identity_layer(model_type)
    scores = block_influence(model, sample_input_ids())
    assert scores[IDENTITY_LAYER] < 1e-5
    others = torch.cat([scores[:IDENTITY_LAYER], scores[IDENTITY_LAYER + 1 :]])
    assert (others > 1e-3).all()
    assert int(scores.argmin()) == IDENTITY_LAYER


@torch.no_grad()
def test_block_influence_matches_the_models_own_hidden_states() -> None:
    model = deep_tiny_model("llama")
    tokens = sample_input_ids()
    # hidden_states[i] is layer i's input; the last entry has the final norm applied, so only
    # the layers before the last can be checked this way.
    hidden = model(tokens, output_hidden_states=True).hidden_states
    expected = [
        1 - F.cosine_similarity(hidden[i][:, 1:], hidden[i + 1][:, 1:], dim=-1).mean()
        for i in range(LAYERS - 1)
    ]
    scores = block_influence(model, tokens)
    torch.testing.assert_close(scores[: LAYERS - 1], torch.stack(expected), rtol=0, atol=1e-5)


@torch.no_grad()
def test_block_influence_leaves_out_each_sequences_first_token() -> None:
    model = deep_tiny_model("llama")
    tokens = sample_input_ids()
    scores = block_influence(model, tokens)

    def flip_first_position(module, args, output):
        # The last layer's output feeds no other layer, so only its own score can change.
        output = output.clone()
        output[:, 0] = -args[0][:, 0]
        return output

    handle = decoder_layers(model)[-1].register_forward_hook(flip_first_position)
    try:
        flipped = block_influence(model, tokens)
    finally:
        handle.remove()
    assert torch.equal(flipped, scores)


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_skip_kl_is_zero_for_a_layer_that_adds_nothing_and_positive_elsewhere(
    model_type: str,
) -> None:
    model = with_identity_layer(model_type)
    scores = skip_kl(model, sample_input_ids(), batch_size=1)
    assert scores.shape == (LAYERS,)
    assert torch.isfinite(scores).all()
    assert scores[IDENTITY_LAYER] < 1e-6
    others = torch.cat([scores[:IDENTITY_LAYER], scores[IDENTITY_LAYER + 1 :]])
    assert (others > 1e-4).all()


@torch.no_grad()
def test_skip_kl_matches_a_direct_kl_of_the_dense_and_skipped_distributions() -> None:
    model = deep_tiny_model("llama")
    tokens = sample_input_ids()
    dense = F.log_softmax(model(tokens).logits, dim=-1)
    expected = []
    for index in range(LAYERS):
        with skipping(model, index):
            skipped = F.log_softmax(model(tokens).logits, dim=-1)
        # F.kl_div(input=log q, target=log p, log_target=True) is KL(p || q), summed here.
        kl = F.kl_div(skipped, dense, log_target=True, reduction="sum") / tokens.numel()
        expected.append(kl)
    scores = skip_kl(model, tokens, batch_size=1)
    torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_skipping_restores_the_layer_afterwards() -> None:
    model = deep_tiny_model("llama")
    tokens = sample_input_ids()
    with torch.no_grad():
        before = model(tokens).logits
        with skipping(model, 1):
            during = model(tokens).logits
        after = model(tokens).logits
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)


@pytest.mark.usefixtures("no_disk_cache")
def test_scores_default_to_the_models_own_text(monkeypatch: pytest.MonkeyPatch) -> None:
    import prunenet.analysis.influence as influence

    monkeypatch.setattr(influence, "INFLUENCE_SELFGEN", SMALL_SELFGEN)
    model = deep_tiny_model("llama")
    own = influence.own_text(model, SMALL_SELFGEN)
    torch.testing.assert_close(
        block_influence(model, selfgen=SMALL_SELFGEN), block_influence(model, own)
    )


@pytest.mark.parametrize("shape", [(2, 1), (12,)], ids=["one-token", "flat"])
def test_tokens_without_a_second_position_are_refused(shape: tuple[int, ...]) -> None:
    tokens = torch.full(shape, 5)
    with pytest.raises(PruneNetError, match="length >= 2"):
        block_influence(deep_tiny_model("llama"), tokens)


def test_skip_kl_refuses_an_empty_batch_size() -> None:
    with pytest.raises(PruneNetError, match="batch_size"):
        skip_kl(deep_tiny_model("llama"), sample_input_ids(), batch_size=0)
