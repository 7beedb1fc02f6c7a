"""Layer-by-layer analysis: calling each decoder layer on captured inputs is the model's own
forward pass, and the sequential refit repairs every layer on tokens it did not fit on."""

from __future__ import annotations

import pytest
import torch

from prunenet.analysis.layer_calls import (
    capture_layer_inputs,
    ffn_activations,
    ffn_block,
    ffn_inputs_by_blocks,
    run_layer,
)
from prunenet.analysis.selfgen import SelfGenConfig, generate_own_text
from prunenet.analysis.sequential import SequentialCut
from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.compress import prune_model
from prunenet.core.config_fields import ffn_widths
from prunenet.core.ratios import uniform_keep
from prunenet.core.surgery import ffn_modules
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
    refit = SequentialCut(model, "lsq", generate_own_text(model, SELFGEN))
    scores = [torch.rand(width, generator=torch.Generator().manual_seed(0)) for width in widths]
    prune_model(model, scores, uniform_keep(widths, 0.5), cut=refit)
    assert all(row["held_error_refit"] < row["held_error_cut"] for row in refit.log.layers)


def test_the_sequential_refit_refuses_layers_out_of_order() -> None:
    model = tiny_model("llama")
    refit = SequentialCut(model, "lsq", generate_own_text(model, SELFGEN))
    with pytest.raises(PruneNetError, match="in order"):
        refit(1, decoder_layers(model)[1], torch.rand(ffn_widths(model.config)[1]), 4)


def test_a_bias_refit_is_refused_where_no_output_bias_can_be_stored() -> None:
    with pytest.raises(PruneNetError, match="cannot store"):
        model = tiny_model("qwen2")
        SequentialCut(model, "bias", generate_own_text(model, SELFGEN))


def recording_score(records: list):
    """A layer score that remembers what it saw and ranks rows by their rms activation."""

    def score(ffn, stats, index, count):
        records.append((index, stats.rms.clone()))
        return stats.rms

    return score


def test_sequential_scores_see_the_activations_of_the_already_cut_model() -> None:
    model = tiny_model("llama")
    tokens = generate_own_text(model, SELFGEN)
    widths = ffn_widths(model.config)
    records: list = []
    cut = SequentialCut(model, "none", tokens, recording_score(records))
    prune_model(model, None, uniform_keep(widths, 0.5), cut=cut)
    assert [index for index, _ in records] == list(range(len(widths)))
    # The last layer's FFN input does not depend on its own cut: a full forward pass of the
    # finished (cut) model on the fitting sequences must reproduce what the score saw there.
    held = cut.log.held_out_sequences
    captured = []
    last = decoder_layers(model)[-1]
    handle = last.mlp.down_proj.register_forward_pre_hook(
        lambda module, inputs: captured.append(inputs[0].reshape(-1, inputs[0].shape[-1]))
    )
    with torch.no_grad():
        model(tokens[:-held], use_cache=False)
    handle.remove()
    kept_rms = captured[0].pow(2).mean(dim=0).sqrt()
    seen = records[-1][1]
    torch.testing.assert_close(seen.sort().values[-kept_rms.numel() :], kept_rms.sort().values)


def test_layer_zero_is_scored_on_the_dense_activations_and_later_layers_are_not() -> None:
    dense = tiny_model("llama")
    tokens = generate_own_text(dense, SELFGEN)
    widths = ffn_widths(dense.config)
    held_rows = 2 * tokens.shape[1]  # a quarter of 8 sequences
    hidden, arguments = capture_layer_inputs(dense, tokens)
    dense_rms = []
    for layer, args in zip(decoder_layers(dense), arguments, strict=True):
        acts = ffn_activations(layer, adapter_for(dense.config), hidden, args)[:-held_rows]
        dense_rms.append(acts.pow(2).mean(dim=0).sqrt())
        hidden = run_layer(layer, hidden, args)
    records: list = []
    model = tiny_model("llama")
    prune_model(model, None, uniform_keep(widths, 0.5),
                cut=SequentialCut(model, "none", tokens, recording_score(records)))  # fmt: skip
    torch.testing.assert_close(records[0][1], dense_rms[0])
    assert not torch.allclose(records[1][1], dense_rms[1])


def test_a_cut_without_scores_or_a_scorer_is_refused() -> None:
    model = tiny_model("llama")
    widths = ffn_widths(model.config)
    with pytest.raises(PruneNetError, match="No scores"):
        prune_model(model, None, uniform_keep(widths, 0.5))
    cut = SequentialCut(model, "none", generate_own_text(model, SELFGEN))
    with pytest.raises(PruneNetError, match="No scores for layer 0"):
        prune_model(model, None, uniform_keep(widths, 0.5), cut=cut)


def test_refit_aware_selection_needs_the_lsq_refit_and_picks_its_own_rows() -> None:
    model = tiny_model("llama")
    tokens = generate_own_text(model, SELFGEN)
    with pytest.raises(PruneNetError, match="--refit lsq"):
        SequentialCut(model, "bias", tokens, select="refit-aware")
    widths = ffn_widths(model.config)
    kept = uniform_keep(widths, 0.5)
    records: list = []
    aware = SequentialCut(model, "lsq", tokens, recording_score(records), select="refit-aware")
    prune_model(model, None, kept, cut=aware)
    assert records == []  # the scorer is not asked: the selection ranks rows itself
    assert all(entry["held_error_refit"] <= entry["held_error_cut"] for entry in aware.log.layers)


def test_the_sequential_refit_runs_in_bf16_and_keeps_every_weight_bf16() -> None:
    # Layers run in the model's dtype, the refit's algebra in float64, and the refitted output
    # projections (and the intercepts it adds) are written back in the layer's dtype.
    model = tiny_model("llama").bfloat16()
    widths = ffn_widths(model.config)
    refit = SequentialCut(model, "lsq", generate_own_text(model, SELFGEN))
    scores = [torch.rand(width, generator=torch.Generator().manual_seed(0)) for width in widths]
    prune_model(model, scores, uniform_keep(widths, 0.5), cut=refit)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.mlp_bias is True
    assert all(row["held_error_refit"] < row["held_error_cut"] for row in refit.log.layers)


def test_ffn_activations_that_overflow_float16_are_refused_naming_bfloat16() -> None:
    model = tiny_model("llama").half()
    mlp = decoder_layers(model)[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight.mul_(2000.0)
        mlp.up_proj.weight.mul_(2000.0)
    tokens = torch.cat(
        [torch.ones(4, 1, dtype=torch.long), sample_input_ids(length=15)[:1].expand(4, -1)], dim=1
    )
    cut = SequentialCut(model, "lsq", tokens)
    with pytest.raises(PruneNetError, match="layer 0's FFN activations.*--dtype bfloat16"):
        cut(0, decoder_layers(model)[0], torch.rand(ffn_widths(model.config)[0]), 4)


def test_capturing_inputs_runs_no_layer_and_keeps_an_instance_forward() -> None:
    """Offloading hooks replace a layer's forward on the instance: the capture puts it back."""
    model = tiny_model("llama")
    layers = decoder_layers(model)
    calls: list[int] = []
    original = layers[0].forward

    def hooked(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layers[0].forward = hooked
    capture_layer_inputs(model, sample_input_ids())
    assert calls == []  # the capture ran no layer, not even the hooked one
    assert layers[0].forward is hooked
    assert "forward" not in layers[1].__dict__


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "gemma3_text"])
@pytest.mark.parametrize("refit", ["none", "lsq"])
def test_the_hidden_states_a_cut_passes_on_are_what_the_cut_layer_computes(
    model_type: str, refit: str, monkeypatch
) -> None:
    # The cut happens inside the layer's own forward: what it hands the next layer must be
    # the cut (and refitted) layer's output, as if the layer had been run again once cut.
    # Small blocks: the FFN block runs its rows in several blocks (OPT has no FFN block).
    monkeypatch.setattr("prunenet.analysis.sequential.BLOCK_ROWS", 37)
    model = tiny_model(model_type)
    widths = ffn_widths(model.config)
    cut = SequentialCut(model, refit, generate_own_text(model, SELFGEN))
    layers, keep = decoder_layers(model), uniform_keep(widths, 0.5)
    for index, layer in enumerate(layers):
        before = cut.hidden
        cut(index, layer, torch.rand(widths[index], generator=torch.Generator().manual_seed(index)),
            keep[index])  # fmt: skip
        again = run_layer(layer, before, cut.layer_kwargs[index])
        torch.testing.assert_close(cut.hidden, again, rtol=1e-5, atol=1e-5)


def test_each_layer_runs_once_per_cut() -> None:
    model = tiny_model("llama")
    widths = ffn_widths(model.config)
    cut = SequentialCut(model, "lsq", generate_own_text(model, SELFGEN))
    calls = []
    for layer in decoder_layers(model):
        layer.register_forward_pre_hook(lambda module, args: calls.append(module))
    scores = [torch.rand(width) for width in widths]
    prune_model(model, scores, uniform_keep(widths, 0.5), cut=cut)
    assert len(calls) == len(decoder_layers(model))
    assert set(cut.log.seconds) == {"forward", "scores", "refit"}


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_ffn_inputs_by_blocks_are_the_inputs_of_one_full_pass(model_type: str) -> None:
    model = tiny_model(model_type)
    adapter = adapter_for(model.config)
    layer = decoder_layers(model)[0]
    block = ffn_block(layer, adapter)
    with torch.no_grad():
        normed = torch.randn(2, 16, model.config.hidden_size)
        expected = []
        handle = ffn_modules(layer, adapter)[1].register_forward_pre_hook(
            lambda module, inputs: expected.append(inputs[0].reshape(-1, inputs[0].shape[-1]))
        )
        block(normed)
        handle.remove()
    got = ffn_inputs_by_blocks(block.forward, ffn_modules(layer, adapter)[1], normed, 5)
    torch.testing.assert_close(got, expected[0])


def test_an_ffn_block_that_changes_its_output_projections_output_is_refused() -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    block = ffn_block(decoder_layers(model)[0], adapter)
    output = ffn_modules(decoder_layers(model)[0], adapter)[1]
    with pytest.raises(PruneNetError, match="does more after its output projection"):
        ffn_inputs_by_blocks(
            lambda x: 2 * block(x), output, torch.randn(3, model.config.hidden_size), 2
        )


def test_opt_computes_its_ffn_inline_and_llama_in_a_block() -> None:
    assert (
        ffn_block(decoder_layers(tiny_model("opt"))[0], adapter_for(tiny_model("opt").config))
        is None
    )
    llama = tiny_model("llama")
    assert (
        ffn_block(decoder_layers(llama)[0], adapter_for(llama.config))
        is decoder_layers(llama)[0].mlp
    )
