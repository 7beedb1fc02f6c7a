"""Self-generated text and the FFN activations recorded on it (the data-free signal)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prunenet.analysis import selfgen
from prunenet.analysis.selfgen import (
    SelfGenConfig,
    collect_activations,
    generate_own_text,
    start_token_id,
)
from prunenet.core.arch import decoder_layers
from prunenet.core.config_fields import ffn_width
from prunenet.errors import PruneNetError
from prunenet.io.cache import CacheWarning, entry_path
from tests.conftest import SMALL_SELFGEN as SMALL
from tests.conftest import SPECIAL_TOKENS, tiny_model

pytestmark = pytest.mark.usefixtures("no_disk_cache")


# ----- generate_own_text -------------------------------------------------------------------------


def test_generate_own_text_is_deterministic_for_a_seed() -> None:
    model = tiny_model("llama")
    assert torch.equal(generate_own_text(model, SMALL), generate_own_text(model, SMALL))


def test_generate_own_text_differs_between_seeds() -> None:
    model = tiny_model("llama")
    other = SelfGenConfig(sequences=2, length=16, kept_tokens=16, seed=1)
    assert not torch.equal(generate_own_text(model, SMALL), generate_own_text(model, other))


def test_generate_own_text_starts_with_the_start_token_and_has_the_requested_shape() -> None:
    model = tiny_model("llama")
    tokens = generate_own_text(model, SMALL)
    assert tokens.shape == (SMALL.sequences, SMALL.length)
    assert torch.all(tokens[:, 0] == SPECIAL_TOKENS["bos_token_id"])


def test_generate_own_text_leaves_the_global_rng_untouched() -> None:
    model = tiny_model("llama")
    torch.manual_seed(5)
    generate_own_text(model, SMALL)
    after_generation = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_generation, torch.rand(3))


def test_start_token_falls_back_to_eos_when_there_is_no_bos() -> None:
    model = tiny_model("llama")
    model.generation_config.bos_token_id = None
    model.config.bos_token_id = None
    assert start_token_id(model) == SPECIAL_TOKENS["eos_token_id"]


# ----- collect_activations -----------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_collect_activations_has_one_entry_per_layer_with_per_neuron_shapes(
    model_type: str,
) -> None:
    model = tiny_model(model_type)
    width = ffn_width(model.config)
    activations = collect_activations(model, SMALL)
    assert len(activations) == len(decoder_layers(model))
    for layer in activations:
        assert layer.rms.shape == layer.mean_abs.shape == layer.max_abs.shape == (width,)
        assert layer.sample.shape == (SMALL.kept_tokens, width)


def test_collect_activations_sample_is_capped_by_the_number_of_generated_tokens() -> None:
    config = SelfGenConfig(sequences=2, length=8, kept_tokens=1000)
    activations = collect_activations(tiny_model("llama"), config)
    assert activations[0].sample.shape[0] == config.sequences * config.length


def test_collect_activations_match_the_mlp_intermediate_computed_directly() -> None:
    model = tiny_model("llama")
    config = SelfGenConfig(sequences=2, length=16, kept_tokens=32)  # every token kept
    tokens = generate_own_text(model, config)
    mlp_inputs = []
    handles = [
        layer.mlp.register_forward_pre_hook(lambda m, args: mlp_inputs.append(args[0]))
        for layer in decoder_layers(model)
    ]
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()

    activations = collect_activations(model, config)
    for layer, hidden, recorded in zip(decoder_layers(model), mlp_inputs, activations, strict=True):
        mlp = layer.mlp
        with torch.no_grad():
            intermediate = (mlp.act_fn(mlp.gate_proj(hidden)) * mlp.up_proj(hidden)).flatten(0, 1)
        assert torch.allclose(recorded.rms, intermediate.pow(2).mean(0).sqrt(), atol=1e-5)
        assert torch.allclose(recorded.mean_abs, intermediate.abs().mean(0), atol=1e-5)
        assert torch.allclose(recorded.max_abs, intermediate.abs().amax(0), atol=1e-5)
        # The sample is a seeded permutation of the same token rows.
        assert torch.allclose(
            recorded.sample.pow(2).sum(0), intermediate.pow(2).sum(0), rtol=1e-4, atol=1e-5
        )


def test_a_model_with_a_learned_position_table_writes_no_longer_than_its_table() -> None:
    model = tiny_model("gpt2")  # n_positions 64
    tokens = generate_own_text(model, SelfGenConfig(sequences=2, length=100, seed=0))
    assert tokens.shape == (2, 64)


def test_rotary_models_write_the_requested_length_past_their_nominal_maximum() -> None:
    model = tiny_model("llama")  # max_position_embeddings 64, rotary
    tokens = generate_own_text(model, SelfGenConfig(sequences=1, length=80, seed=0))
    assert tokens.shape == (1, 80)


def test_own_text_is_generated_once_then_read_from_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PRUNENET_NO_CACHE")  # this test is about the (per-test) cache
    model = tiny_model("llama")
    calls = []
    real = selfgen.generate_own_text
    monkeypatch.setattr(selfgen, "generate_own_text", lambda m, c: calls.append(c) or real(m, c))
    first = selfgen.own_text(model, SMALL)
    second = selfgen.own_text(model, SMALL)
    assert len(calls) == 1 and torch.equal(first, second)


def test_own_text_regenerates_a_cache_entry_with_ids_outside_the_vocabulary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PRUNENET_NO_CACHE")
    model = tiny_model("llama")
    tokens = selfgen.own_text(model, SMALL)
    path = entry_path("selfgen-text", model, dataclasses.asdict(SMALL))
    # A consistent (checksummed) entry whose ids are out of range: only the decode check stops it.
    from prunenet.io import cache

    cache._write_entry(path, cache._entry_key("selfgen-text", model, dataclasses.asdict(SMALL)),
                       {"tokens": torch.full_like(tokens, 10**6)}, {})  # fmt: skip
    with pytest.warns(CacheWarning, match="outside the vocabulary"):
        again = selfgen.own_text(model, SMALL)
    assert torch.equal(again, tokens)


def _float16_llama_that_overflows() -> torch.nn.Module:
    """A tiny float16 Llama whose first FFN's products exceed float16's 65504."""
    model = tiny_model("llama").half()
    mlp = decoder_layers(model)[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight.mul_(2000.0)
        mlp.up_proj.weight.mul_(2000.0)
    return model


def test_writing_text_with_a_model_that_overflows_float16_is_refused_naming_bfloat16() -> None:
    with pytest.raises(PruneNetError, match="overflow float16.*--dtype bfloat16"):
        generate_own_text(_float16_llama_that_overflows(), SMALL)


def test_writing_text_in_bf16_gives_token_ids_of_the_requested_shape() -> None:
    tokens = generate_own_text(tiny_model("llama").bfloat16(), SMALL)
    assert tokens.dtype == torch.int64
    assert tokens.shape == (SMALL.sequences, SMALL.length)


# ----- SelfGenConfig's values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("length", 1, "length 1 must be a whole number from 2 to"),
        ("length", 0, "length 0 must be a whole number from 2 to"),
        ("sequences", 0, "sequences 0 must be a whole number from 1 to"),
        (
            "seed",
            2**70,
            "seed 1180591620717411303424 must be a whole number from 0 to 4,294,967,295",
        ),
        ("seed", 2**32, "seed 4294967296 must be a whole number from 0 to 4,294,967,295"),
        ("seed", -1, "seed -1 must be a whole number from 0"),
        ("seed", True, "seed True must be a whole number"),
        ("length", 16.0, "length 16.0 must be a whole number"),
        ("kept_tokens", 0, "kept_tokens 0 must be a whole number from 1"),
    ],
)
def test_values_no_generator_can_use_are_refused_when_the_config_is_made(
    field: str, value: object, message: str
) -> None:
    with pytest.raises(PruneNetError, match=message):
        SelfGenConfig(**{field: value})


def test_the_shortest_text_is_the_start_token_and_one_sampled_token() -> None:
    tokens = generate_own_text(tiny_model("llama"), SelfGenConfig(sequences=2, length=2))
    assert tokens.shape == (2, 2)


def test_the_largest_seed_seeds_every_generator() -> None:
    config = SelfGenConfig(sequences=1, length=4, seed=2**32 - 1, kept_tokens=2)
    assert collect_activations(tiny_model("llama"), config)[0].sample.shape[0] == 2
