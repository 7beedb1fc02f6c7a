"""Compressor: ratio validation, row selection, in-place pruning, reports, and reloadable saves."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.compress import count_parameters, prune_model, select_keep_indices
from prunenet.core.config_fields import ffn_width, ffn_widths
from prunenet.core.ratios import keep_count, uniform_keep, validate_ratio
from prunenet.core.surgery import ffn_weights
from prunenet.errors import PruneNetError
from prunenet.io.saving import REPORT_FILE, save_pruned
from prunenet.scoring.heuristics import MagnitudeScorer, RandomScorer
from tests.conftest import (
    ALL_MODEL_TYPES,
    FFN_WIDTH,
    HIDDEN_SIZE,
    NUM_LAYERS,
    VOCAB_SIZE,
    logits_of,
    tiny_model,
)


def _kept_indices(scores: list[torch.Tensor], width: int, ratio: float) -> list[torch.Tensor]:
    return [select_keep_indices(s, keep_count(width, ratio)) for s in scores]


# ----- ratio validation -------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1], ids=["int-zero", "zero", "negative"])
def test_ratio_at_or_below_zero_is_refused(ratio: float) -> None:
    with pytest.raises(PruneNetError, match=r"outside \(0, 1\)"):
        validate_ratio(ratio)


@pytest.mark.parametrize("ratio", [1, 1.0, 1.5, math.inf], ids=["int-one", "one", "1.5", "inf"])
def test_ratio_at_or_above_one_is_refused(ratio: float) -> None:
    with pytest.raises(PruneNetError, match=r"outside \(0, 1\)"):
        validate_ratio(ratio)


@pytest.mark.parametrize("ratio", ["abc", "", None, "0.3x"])
def test_non_numeric_ratio_is_refused(ratio: object) -> None:
    with pytest.raises(PruneNetError, match="not a number"):
        validate_ratio(ratio)


@pytest.mark.parametrize("ratio", [math.nan, "nan", "NaN"])
def test_nan_ratio_is_refused(ratio: object) -> None:
    with pytest.raises(PruneNetError, match=r"outside \(0, 1\)"):
        validate_ratio(ratio)


def test_numeric_string_ratio_is_accepted_as_float() -> None:
    assert validate_ratio("0.25") == 0.25


# ----- how many rows, and which ----------------------------------------------------------------


def test_keep_count_keeps_round_of_the_remaining_fraction() -> None:
    # SmolLM2's FFN: 30% of 1536 rows removed leaves 1075 (0.7 * 1536 = 1075.2).
    assert keep_count(1536, 0.3) == 1075


def test_ratio_that_would_remove_every_row_is_refused() -> None:
    with pytest.raises(PruneNetError, match="would remove all 24 FFN rows"):
        keep_count(24, 0.99)


@pytest.mark.parametrize("width", [3, 24, 1536, 11008])
def test_largest_ratio_suggested_by_the_refusal_keeps_one_row(width: int) -> None:
    with pytest.raises(PruneNetError) as error:
        keep_count(width, 1 - 0.1 / width)
    suggested = float(re.search(r"at most ([0-9.]+) keeps one row", str(error.value)).group(1))
    assert keep_count(width, suggested) >= 1


def test_select_keep_indices_keeps_the_highest_scores_in_original_order() -> None:
    scores = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3])
    assert select_keep_indices(scores, 3).tolist() == [0, 1, 3]


def test_select_keep_indices_breaks_ties_by_lower_row_index() -> None:
    scores = torch.tensor([1.0, 2.0, 1.0, 1.0, 2.0])
    assert select_keep_indices(scores, 3).tolist() == [0, 1, 4]


def test_random_scores_with_the_same_seed_keep_identical_indices() -> None:
    model = tiny_model("llama")
    first = _kept_indices(RandomScorer(seed=7).score_model(model), FFN_WIDTH, 0.5)
    second = _kept_indices(RandomScorer(seed=7).score_model(model), FFN_WIDTH, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_random_scores_with_different_seeds_keep_different_indices() -> None:
    model = tiny_model("llama")
    first = _kept_indices(RandomScorer(seed=7).score_model(model), FFN_WIDTH, 0.5)
    second = _kept_indices(RandomScorer(seed=8).score_model(model), FFN_WIDTH, 0.5)
    assert any(not torch.equal(a, b) for a, b in zip(first, second, strict=True))


# ----- pruning a model --------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_pruned_model_reloads_with_identical_logits(model_type: str, tmp_path: Path) -> None:
    model = tiny_model(model_type)
    width = ffn_width(model.config)
    scores = RandomScorer(seed=3).score_model(model)
    kept = _kept_indices(scores, width, 0.5)
    assert not torch.equal(kept[0], kept[1]), "layers should keep different rows in this test"

    report = prune_model(model, scores, uniform_keep(ffn_widths(model.config), 0.5))
    save_pruned(model, None, tmp_path / "pruned", report)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()

    assert ffn_width(reloaded.config) == keep_count(width, 0.5)
    assert torch.equal(logits_of(reloaded), logits_of(model))


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_ratio_that_keeps_every_row_leaves_logits_unchanged(model_type: str) -> None:
    original, pruned = tiny_model(model_type), tiny_model(model_type)
    width = ffn_width(pruned.config)
    ratio = 0.4 / width  # removes less than half a row: rounding keeps all of them
    assert keep_count(width, ratio) == width

    prune_model(
        pruned,
        RandomScorer(seed=3).score_model(pruned),
        uniform_keep(ffn_widths(pruned.config), ratio),
    )

    assert torch.equal(logits_of(pruned), logits_of(original))


def test_prune_model_keeps_the_rows_its_scores_select() -> None:
    model, original = tiny_model("llama"), tiny_model("llama")
    adapter = adapter_for(model.config)
    scores = RandomScorer(seed=5).score_model(model)
    kept = _kept_indices(scores, FFN_WIDTH, 0.5)

    prune_model(model, scores, uniform_keep(ffn_widths(model.config), 0.5))

    pairs = zip(decoder_layers(model), decoder_layers(original), kept, strict=True)
    for layer, original_layer, keep in pairs:
        pruned_ffn, original_ffn = ffn_weights(layer, adapter), ffn_weights(original_layer, adapter)
        assert torch.equal(pruned_ffn.output, original_ffn.output[:, keep])
        for cut, full in zip(pruned_ffn.inputs, original_ffn.inputs, strict=True):
            assert torch.equal(cut, full[keep])


def test_report_counts_removed_parameters_and_both_ratios() -> None:
    model = tiny_model("llama")
    report = prune_model(
        model, RandomScorer(seed=0).score_model(model), uniform_keep(ffn_widths(model.config), 0.5)
    )
    removed_rows = FFN_WIDTH - keep_count(FFN_WIDTH, 0.5)

    # Llama's FFN has three bias-free matrices per layer (gate, up, down), each d_model x d_ff.
    assert report.params_before - report.params_after == NUM_LAYERS * 3 * HIDDEN_SIZE * removed_rows
    assert report.params_after == count_parameters(model)
    assert report.ffn_widths_after == [FFN_WIDTH - removed_rows] * NUM_LAYERS
    assert report.ffn_ratio == pytest.approx(removed_rows / FFN_WIDTH)
    assert 0 < report.params_removed_fraction < report.ffn_ratio


def test_count_parameters_counts_tied_embeddings_once() -> None:
    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # Counted by hand from the tiny config: hidden 16, FFN 24, 2 heads of 8 with 1 KV head.
    embeddings, attention, ffn, norms = (
        VOCAB_SIZE * HIDDEN_SIZE,
        2 * 16 * 16 + 2 * 16 * 8,
        3 * 16 * 24,
        2 * 16,
    )
    expected = embeddings + NUM_LAYERS * (attention + ffn + norms) + HIDDEN_SIZE
    assert count_parameters(model) == expected
    untied = tiny_model("llama", tie_word_embeddings=False)
    assert count_parameters(untied) - count_parameters(model) == model.lm_head.weight.numel()


def test_prune_model_refuses_a_score_vector_of_the_wrong_length() -> None:
    model = tiny_model("llama")
    with pytest.raises(PruneNetError, match=f"FFN width is {FFN_WIDTH}"):
        prune_model(
            model,
            [torch.rand(FFN_WIDTH), torch.rand(FFN_WIDTH + 1)],
            uniform_keep(ffn_widths(model.config), 0.5),
        )


def test_prune_model_refuses_a_score_vector_count_other_than_the_layer_count() -> None:
    model = tiny_model("llama")
    with pytest.raises(PruneNetError, match=f"model with {NUM_LAYERS} layers"):
        prune_model(model, [torch.rand(FFN_WIDTH)], uniform_keep(ffn_widths(model.config), 0.5))


def test_refused_keep_count_leaves_the_model_untouched() -> None:
    model, original = tiny_model("llama"), tiny_model("llama")
    with pytest.raises(PruneNetError, match="Cannot keep 0 rows"):
        prune_model(model, RandomScorer().score_model(model), [0, 0])
    assert ffn_width(model.config) == FFN_WIDTH
    assert torch.equal(logits_of(model), logits_of(original))


def test_refusal_in_a_later_layer_leaves_earlier_layers_uncut() -> None:
    model, original = tiny_model("llama"), tiny_model("llama")
    with pytest.raises(PruneNetError, match="Cannot keep 0 rows"):
        prune_model(model, RandomScorer().score_model(model), [FFN_WIDTH // 2, 0])
    assert ffn_width(model.config) == FFN_WIDTH
    assert torch.equal(logits_of(model), logits_of(original))


# ----- saving -----------------------------------------------------------------------------------


def test_saved_folder_holds_the_report_with_both_ratios(tmp_path: Path) -> None:
    model = tiny_model("llama")
    report = prune_model(
        model, RandomScorer().score_model(model), uniform_keep(ffn_widths(model.config), 0.5)
    )
    out = save_pruned(model, None, tmp_path / "pruned", report)
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved["ffn_ratio"] == pytest.approx(report.ffn_ratio)
    assert saved["params_removed_fraction"] == pytest.approx(report.params_removed_fraction)
    assert saved["ffn_widths_after"] == report.ffn_widths_after


# ----- a real model -----------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_pruned_at_30_percent_reloads_and_generates(tmp_path: Path) -> None:
    from prunenet.io.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        30,
        576,
        1536,
    )
    params_before = sum(p.numel() for p in model.parameters())

    report = prune_model(
        model, MagnitudeScorer().score_model(model), uniform_keep(ffn_widths(model.config), 0.3)
    )
    save_pruned(model, tokenizer, tmp_path / "smollm2-pruned", report)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2-pruned").eval()

    assert reloaded.config.intermediate_size == 1075
    expected = params_before - 30 * 3 * 576 * (1536 - 1075)
    assert sum(p.numel() for p in reloaded.parameters()) == expected
    assert report.params_after == expected

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    greedy = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        generated = reloaded.generate(**prompt, **greedy)
        in_memory = model.generate(**prompt, **greedy)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4
    assert torch.equal(generated, in_memory)
