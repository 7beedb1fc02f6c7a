"""Self-generated text and the FFN activations recorded on it (the data-free signal)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prunenet.analysis import selfgen
from prunenet.analysis.sampling import Sample, batch_seed, batch_sizes, kv_cache_bytes
from prunenet.analysis.selfgen import (
    SelfGenConfig,
    cache_settings,
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


# ----- batches ---------------------------------------------------------------------------------

# A text of 5 sequences written in batches of at most 2 (2, 2, 1).
BATCHED = SelfGenConfig(sequences=5, length=12, seed=7)


def _two_sequence_budget(model: torch.nn.Module) -> int:
    return 2 * kv_cache_bytes(model.config, BATCHED.length, torch.float32)


def test_one_sequences_kv_cache_is_keys_and_values_of_every_layers_kv_heads() -> None:
    model = tiny_model("llama")  # 2 layers, 1 KV head of 8 (hidden 16 / 2 heads)
    assert kv_cache_bytes(model.config, 10, torch.float32) == 2 * 2 * 1 * 8 * 10 * 4
    assert kv_cache_bytes(model.config, 10, torch.bfloat16) == 2 * 2 * 1 * 8 * 10 * 2


def test_batches_are_as_few_as_the_budget_allows_and_as_equal_as_possible() -> None:
    config = tiny_model("llama").config
    per_sequence = kv_cache_bytes(config, 16, torch.float32)
    assert batch_sizes(config, 10, 16, torch.float32, 4 * per_sequence) == [4, 3, 3]
    assert batch_sizes(config, 10, 16, torch.float32, 100 * per_sequence) == [10]
    assert batch_sizes(config, 3, 16, torch.float32, 1) == [1, 1, 1]  # one at least


def test_a_text_of_several_batches_is_each_batch_written_alone_with_its_seed() -> None:
    model = tiny_model("llama")
    budget = _two_sequence_budget(model)
    tokens = generate_own_text(model, BATCHED, cache_budget=budget)
    first = 0
    for index, size in enumerate([2, 2, 1]):
        alone = SelfGenConfig(sequences=size, length=BATCHED.length,
                              seed=batch_seed(BATCHED.seed, index))  # fmt: skip
        assert torch.equal(tokens[first : first + size], generate_own_text(model, alone, budget))
        first += size


def test_a_text_of_several_batches_starts_every_sequence_with_the_start_token() -> None:
    tokens = generate_own_text(
        tiny_model("llama"), BATCHED, _two_sequence_budget(tiny_model("llama"))
    )
    assert tokens.shape == (BATCHED.sequences, BATCHED.length)
    assert torch.all(tokens[:, 0] == SPECIAL_TOKENS["bos_token_id"])


def test_batches_are_seeded_apart() -> None:
    seeds = [batch_seed(0, index) for index in range(100)] + [batch_seed(1, 1)]
    assert len(set(seeds)) == len(seeds) and seeds[0] == 0
    assert all(0 <= seed <= selfgen.MAX_SEED for seed in seeds)


def test_the_sampler_draws_tokens_with_the_softmax_probabilities() -> None:
    probabilities = torch.tensor([0.5, 0.3, 0.2, 0.0])
    scores = probabilities.log().expand(40_000, 4).clone()
    sample = Sample(torch.Generator().manual_seed(0))
    picked = sample(torch.zeros(40_000, 1, dtype=torch.long), scores)
    assert torch.all(torch.isfinite(picked).sum(dim=1) == 1)  # one token left per row
    drawn = torch.bincount(picked.argmax(dim=1), minlength=4) / 40_000
    assert torch.allclose(drawn, probabilities, atol=0.01) and drawn[3] == 0


def test_rounding_the_scores_to_bfloat16_rarely_changes_the_drawn_token() -> None:
    # A model run in bfloat16 (or on other threads) gives slightly different scores; the text
    # must stay the same nearly everywhere. Drawing through the cumulative distribution changed
    # ~5% of a tiny model's tokens; the Gumbel race changes a draw only near a tie of the best.
    scores = torch.randn(20_000, 1_000, generator=torch.Generator().manual_seed(1)) * 3
    rounded = scores.bfloat16().float()

    def draw(values: torch.Tensor) -> torch.Tensor:
        return Sample(torch.Generator().manual_seed(0))(torch.zeros(1), values).argmax(dim=1)

    changed = (draw(scores) != draw(rounded)).float().mean()
    assert changed < 0.01


def test_the_end_token_is_never_written() -> None:
    model = tiny_model("llama")
    end = SPECIAL_TOKENS["eos_token_id"]

    def favour_the_end(module, inputs, logits):
        return logits.index_add(-1, torch.tensor([end]), torch.full_like(logits[..., :1], 100.0))

    model.lm_head.register_forward_hook(favour_the_end)
    tokens = generate_own_text(model, SMALL)
    assert tokens.shape == (SMALL.sequences, SMALL.length)
    assert not torch.any(tokens[:, 1:] == end)


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
    path = entry_path("selfgen-text", model, cache_settings(SMALL))
    # A consistent (checksummed) entry whose ids are out of range: only the decode check stops it.
    from prunenet.io import cache

    cache._write_entry(path, cache._entry_key("selfgen-text", model, cache_settings(SMALL)),
                       {"tokens": torch.full_like(tokens, 10**6)}, {})  # fmt: skip
    with pytest.warns(CacheWarning, match="outside the vocabulary"):
        again = selfgen.own_text(model, SMALL)
    assert torch.equal(again, tokens)


def test_text_cached_by_an_earlier_sampler_is_written_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PRUNENET_NO_CACHE")
    model = tiny_model("llama")
    from prunenet.io import cache

    # What the sampler before batching stored: keyed by the config's fields alone.
    old = dataclasses.asdict(SMALL)
    stale = torch.full((SMALL.sequences, SMALL.length), 3, dtype=torch.long)
    key = cache._entry_key("selfgen-text", model, old)
    cache._write_entry(entry_path("selfgen-text", model, old), key, {"tokens": stale}, {})

    assert torch.equal(selfgen.own_text(model, SMALL), generate_own_text(model, SMALL))


def test_text_cached_under_another_batch_budget_is_written_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The batch budget decides which sequences share a seed: a text written under the 512 MB
    # budget (keyed without it) is another text, and must not be read back as this one.
    monkeypatch.delenv("PRUNENET_NO_CACHE")
    model = tiny_model("llama")
    from prunenet.io import cache

    old = {**dataclasses.asdict(SMALL), **selfgen.SAMPLER}
    stale = torch.full((SMALL.sequences, SMALL.length), 3, dtype=torch.long)
    key = cache._entry_key("selfgen-text", model, old)
    cache._write_entry(entry_path("selfgen-text", model, old), key, {"tokens": stale}, {})

    assert torch.equal(selfgen.own_text(model, SMALL), generate_own_text(model, SMALL))


def test_activations_are_keyed_with_the_samplers_version() -> None:
    model = tiny_model("llama")
    old = dataclasses.asdict(SMALL)
    assert entry_path("activations", model, cache_settings(SMALL)) != entry_path(
        "activations", model, old
    )


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


def test_activations_on_given_tokens_skip_the_output_layer_and_match_a_full_pass() -> None:
    """Each layer's statistics are what a whole forward pass shows its FFN output projection,
    and the output layer never runs (its logits were most of a run's peak memory)."""
    from prunenet.analysis.selfgen import activations_on, layer_activations
    from prunenet.core.arch import adapter_for
    from prunenet.core.surgery import ffn_modules

    model = tiny_model("llama")
    tokens = torch.randint(3, model.config.vocab_size, (3, 10))
    head_calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    try:
        stats = activations_on(model, tokens, kept_tokens=8, seed=0)
    finally:
        handle.remove()
    assert head_calls == []
    seen = []
    adapter = adapter_for(model.config)
    hooks = [
        ffn_modules(layer, adapter)[1].register_forward_pre_hook(
            lambda module, inputs: seen.append(inputs[0].reshape(-1, inputs[0].shape[-1]))
        )
        for layer in decoder_layers(model)
    ]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    assert len(stats) == len(seen) == len(decoder_layers(model))
    for got, acts in zip(stats, seen, strict=True):
        want = layer_activations(acts.float(), kept_tokens=8, seed=0)
        torch.testing.assert_close(got.rms, want.rms)
        torch.testing.assert_close(got.sample, want.sample)
