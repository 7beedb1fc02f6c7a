"""Perplexity on fixed windows: hand-computed value, BOS handling, window choice."""

from __future__ import annotations

import math

import pytest
import torch

from prunenet.errors import PruneNetError
from prunenet.evaluation.perplexity import perplexity, text_windows, token_windows
from tests.conftest import tiny_model, tiny_tokenizer

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


def test_perplexity_equals_hand_computed_value_with_bos_prepended(llama, tokenizer):
    seqlen = 8
    result = perplexity(llama, token_windows(tokenizer, TEXT, seqlen, limit=None))

    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - seqlen + 1, seqlen):
        sequence = [tokenizer.bos_token_id, *ids[start : start + seqlen]]
        with torch.no_grad():
            log_probs = _hand_log_softmax(llama(torch.tensor([sequence])).logits[0])
        for position in range(1, len(sequence)):
            nll -= log_probs[position - 1, sequence[position]].item()
            count += 1
    assert result.windows == len(ids) // seqlen == 5
    assert result.scored_tokens == count == 40
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_without_bos_skips_each_windows_first_token(llama, tokenizer):
    result = perplexity(llama, token_windows(tokenizer, TEXT, 8, limit=None, bos_id=None))
    assert result.scored_tokens == 5 * 7
    assert result.bos_token_id is None


def test_perplexity_is_independent_of_batch_size(llama, tokenizer):
    windows = token_windows(tokenizer, TEXT, 8, limit=None)
    one = perplexity(llama, windows, batch_size=1)
    three = perplexity(llama, windows, batch_size=3)
    assert three.perplexity == pytest.approx(one.perplexity, rel=1e-5)


def test_window_limit_takes_windows_evenly_spaced_through_the_text(tokenizer):
    text = " ".join(f"w{4 + i % 60}" for i in range(100))  # 100 tokens -> 10 windows of 10
    windows = token_windows(tokenizer, text, 10, limit=3)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert windows.ids.tolist() == [ids[s : s + 10] for s in (0, 30, 60)]  # windows 0, 3, 6
    assert (windows.windows_available, windows.corpus_tokens) == (10, 100)


def test_text_shorter_than_one_window_is_refused(tokenizer):
    with pytest.raises(PruneNetError, match="fewer than one window"):
        token_windows(tokenizer, "w4 w5", 8, limit=None)


def test_code_windows_are_the_same_on_every_call(tokenizer):
    first = text_windows(tokenizer, "ppl_code", 16, 4)
    again = text_windows(tokenizer, "ppl_code", 16, 4)
    assert torch.equal(first.ids, again.ids)
    assert first.text_sha256 == again.text_sha256


@pytest.mark.real_model
def test_smollm2_perplexity_on_the_three_domains_is_in_the_expected_range():
    """SmolLM2-135M on one 128-token window per domain (about 5 s)."""
    from prunenet.io.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    values = {
        task: perplexity(model, text_windows(tokenizer, task, 128, 1)).perplexity
        for task in ("ppl_boolq", "ppl_lambada", "ppl_code")
    }
    assert all(1.5 < value < 200 for value in values.values()), values
