"""Evaluation metrics: perplexity by hand, lm-eval's multiple-choice rules, sizes and speed."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from prunenet.core.arch import ffn_widths
from prunenet.core.compress import prune_model
from prunenet.core.ratios import uniform_keep
from prunenet.errors import PruneNetError
from prunenet.evaluation.data import ChoiceItem
from prunenet.evaluation.perplexity import perplexity, token_windows
from prunenet.evaluation.speed import measure_speed, parameter_counts
from prunenet.evaluation.suite import EvaluationSuite
from prunenet.evaluation.zero_shot import (
    choice_logliks,
    encode_item,
    encode_pair,
    evaluate_zero_shot,
    item_correct,
    zero_shot_average,
)
from prunenet.scoring.registry import make_scorer
from tests.conftest import VOCAB_SIZE, tiny_model, tiny_tokenizer

# Words of the tiny tokenizer's vocabulary (w4..w63), so nothing maps to <unk>.
TEXT = " ".join(f"w{4 + (7 * i) % 60}" for i in range(40))


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _hand_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log p = x - (max + log sum exp(x - max)), in float64, without torch.log_softmax."""
    logits = logits.double()
    top = logits.max(dim=-1, keepdim=True).values
    return logits - (top + (logits - top).exp().sum(dim=-1, keepdim=True).log())


def test_perplexity_equals_hand_computed_value(llama, tokenizer):
    seqlen = 8
    windows = token_windows(tokenizer, TEXT, seqlen, limit=None)
    result = perplexity(llama, windows, tokenizer.bos_token_id)

    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - seqlen + 1, seqlen):
        sequence = [tokenizer.bos_token_id, *ids[start : start + seqlen]]
        with torch.no_grad():
            logits = llama(torch.tensor([sequence])).logits[0]
        log_probs = _hand_log_softmax(logits)
        for position in range(1, len(sequence)):
            nll -= log_probs[position - 1, sequence[position]].item()
            count += 1
    assert result.windows == len(ids) // seqlen == 5
    assert result.scored_tokens == count == 40
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_without_bos_skips_each_windows_first_token(llama, tokenizer):
    windows = token_windows(tokenizer, TEXT, 8, limit=None)
    result = perplexity(llama, windows, bos_id=None)
    assert result.scored_tokens == 5 * 7
    assert result.bos_token_id is None


def test_perplexity_is_independent_of_batch_size(llama, tokenizer):
    windows = token_windows(tokenizer, TEXT, 8, limit=None)
    one = perplexity(llama, windows, 1, batch_size=1)
    three = perplexity(llama, windows, 1, batch_size=3)
    assert three.perplexity == pytest.approx(one.perplexity, rel=1e-5)


def test_window_limit_takes_windows_evenly_spaced_through_the_text(tokenizer):
    text = " ".join(f"w{4 + i % 60}" for i in range(100))  # 100 tokens -> 10 windows of 10
    windows = token_windows(tokenizer, text, 10, limit=3)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    starts = [0, 30, 60]  # windows 0, 3, 6 of 10
    assert windows.windows.tolist() == [ids[s : s + 10] for s in starts]
    assert windows.windows_available == 10
    assert windows.corpus_tokens == 100


def test_text_shorter_than_one_window_is_refused(tokenizer):
    with pytest.raises(PruneNetError, match="fewer than one window"):
        token_windows(tokenizer, "w4 w5", 8, limit=None)


def test_acc_norm_divides_by_choice_length_and_can_flip_the_answer():
    # Choice 1 is longer: a lower total log-likelihood but a higher one per character.
    item = ChoiceItem.shared_context("Q:", ["short", "a much longer answer"], gold=1)
    acc, acc_norm = item_correct(item, [-10.0, -12.0])
    assert (acc, acc_norm) == (False, True)
    item_gold_0 = ChoiceItem.shared_context("Q:", ["short", "a much longer answer"], gold=0)
    assert item_correct(item_gold_0, [-10.0, -12.0]) == (True, False)


def test_ties_go_to_the_first_choice_like_numpy_argmax():
    item = ChoiceItem.shared_context("Q:", ["ab", "cd"], gold=0)
    assert item_correct(item, [-1.0, -1.0]) == (True, True)


class PreferredTokenLM(nn.Module):
    """A fake causal LM whose next-token distribution always favours one token.

    Its log-likelihoods are known in closed form, so the zero-shot scorer's choice is known.
    """

    def __init__(self, preferred: int, vocab: int = VOCAB_SIZE) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.bias[preferred] = 5.0
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        keep = logits_to_keep or input_ids.shape[1]
        logits = self.bias.expand(input_ids.shape[0], keep, -1)
        return SimpleNamespace(logits=logits)


def test_zero_shot_picks_the_choice_made_of_the_preferred_token(tokenizer):
    ids = {word: tokenizer.convert_tokens_to_ids(word) for word in ("w7", "w9", "w11")}
    model = PreferredTokenLM(ids["w7"])
    items = [
        ChoiceItem.shared_context("w4 w5", ["w9", "w7", "w11"], gold=1),
        ChoiceItem.shared_context("w6", ["w7 w7 w7", "w9"], gold=0),
    ]
    encoded = [encode_item(tokenizer, item, tokenizer.bos_token_id) for item in items]
    logliks = choice_logliks(model, encoded, batch_size=2)

    log_p = torch.log_softmax(model.bias.detach(), dim=0)
    assert logliks[0] == pytest.approx([log_p[ids[w]].item() for w in ("w9", "w7", "w11")])
    assert logliks[1] == pytest.approx([3 * log_p[ids["w7"]].item(), log_p[ids["w9"]].item()])
    outcomes = [item_correct(i, ll) for i, ll in zip(items, logliks, strict=True)]
    assert outcomes == [(True, True), (True, True)]


def test_batched_padded_logliks_equal_one_sequence_at_a_time(llama, tokenizer):
    items = [
        ChoiceItem.shared_context("w4 w5 w6 w7 w8", ["w9", "w10 w11 w12"], gold=0),
        ChoiceItem.shared_context("w13", ["w14 w15", "w16", "w17 w18 w19 w20"], gold=2),
    ]
    encoded = [encode_item(tokenizer, item, tokenizer.bos_token_id) for item in items]
    batched = choice_logliks(llama, encoded, batch_size=5)
    for item_logliks, choices in zip(batched, encoded, strict=True):
        for value, (tokens, cont_len) in zip(item_logliks, choices, strict=True):
            with torch.no_grad():
                logits = llama(torch.tensor([tokens[:-1]])).logits[0]
            log_probs = _hand_log_softmax(logits)
            expected = sum(
                log_probs[position - 1, tokens[position]].item()
                for position in range(len(tokens) - cont_len, len(tokens))
            )
            assert value == pytest.approx(expected, abs=1e-4)


def test_encode_pair_moves_trailing_context_spaces_to_the_continuation(tokenizer):
    context, continuation = encode_pair(tokenizer, "w4 w5 ", "w6")
    assert tokenizer.convert_ids_to_tokens(context) == ["w4", "w5"]
    assert tokenizer.convert_ids_to_tokens(continuation) == ["w6"]


def test_encode_item_prepends_bos_once_per_choice(tokenizer):
    item = ChoiceItem.shared_context("w4", ["w5", "w6 w7"], gold=0)
    encoded = encode_item(tokenizer, item, tokenizer.bos_token_id)
    assert [tokenizer.convert_ids_to_tokens(t) for t, _ in encoded] == [
        ["<s>", "w4", "w5"],
        ["<s>", "w4", "w6", "w7"],
    ]
    assert [n for _, n in encoded] == [1, 2]


def test_evaluate_zero_shot_on_real_items_reports_sample_and_metrics(llama, tokenizer):
    result = evaluate_zero_shot(llama, tokenizer, "arc_easy", limit=3, seed=0)
    assert result.items == 3
    assert result.items_available == 2376
    assert result.primary_metric == "acc_norm"
    assert result.score == result.acc_norm
    assert 0.0 <= result.acc <= 1.0


def test_winogrande_reports_acc_only(llama, tokenizer):
    result = evaluate_zero_shot(llama, tokenizer, "winogrande", limit=2)
    assert result.acc_norm is None
    assert result.score == result.acc


def test_suite_runs_every_task_kind(llama, tokenizer):
    suite = EvaluationSuite(
        tokenizer, ["ppl_lambada", "piqa"], seqlen=8, ppl_windows=2, limit=2, seed=0
    )
    results = suite.run(llama)
    assert results["ppl_lambada"].windows == 2
    assert results["piqa"].items == 2
    assert zero_shot_average(results) == results["piqa"].score
    assert suite.protocol()["bos_token"] == "<s>"


def test_parameter_counts_find_every_ffn_and_shrink_with_pruning():
    model = tiny_model("llama")
    counts = parameter_counts(model)
    # 2 layers x (gate + up + down) x hidden 16 x d_ff 24, no biases.
    assert counts.ffn == 2 * 3 * 16 * 24
    assert counts.ffn_widths == [24, 24]
    prune_model(
        model,
        make_scorer("magnitude").score_model(model),
        uniform_keep(ffn_widths(model.config), 0.5),
    )
    pruned = parameter_counts(model)
    assert pruned.ffn == counts.ffn // 2
    assert pruned.total == counts.total - counts.ffn // 2


def test_parameter_counts_handle_conv1d_layout():
    counts = parameter_counts(tiny_model("gpt2"))
    assert counts.ffn_widths == [64, 64]  # GPT-2's default d_ff = 4 x hidden


def test_measure_speed_reports_shape_and_consistent_throughput(llama):
    speed = measure_speed(llama, batch_size=2, seqlen=8, repeats=3)
    assert (speed.batch_size, speed.seqlen, len(speed.latencies_s)) == (2, 8, 3)
    assert speed.tokens_per_second == pytest.approx(16 / speed.latency_s)
    assert speed.device.startswith("cpu")


@pytest.mark.real_model
def test_smollm2_perplexity_and_arc_are_in_the_expected_range():
    """SmolLM2-135M on one 256-token window and 8 ARC-Easy questions (about 20 s)."""
    from prunenet.io.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    suite = EvaluationSuite(
        tokenizer, ["ppl_boolq", "arc_easy"], seqlen=256, ppl_windows=1, limit=8, seed=0
    )
    results = suite.run(model)
    assert 5 < results["ppl_boolq"].perplexity < 60
    assert results["arc_easy"].acc_norm >= 0.25
