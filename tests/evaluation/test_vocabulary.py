"""Whether a tokenizer fits a model's embedding (`prunenet eval` refuses, `prune` warns)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from prunenet.evaluation.vocabulary import (
    embedding_rows,
    token_id_count,
    tokenizer_overflow,
    warn_if_tokenizer_overflows,
)
from tests.conftest import VOCAB_SIZE, tiny_model, tiny_tokenizer


def _tokenizer(ids: list[int]) -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in ids}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "t0")))


def test_the_id_count_is_the_largest_id_plus_one_even_with_holes() -> None:
    assert token_id_count(_tokenizer([0, 1, 5, 99])) == 100


def test_a_tokenizer_that_fits_the_embedding_has_no_problem() -> None:
    model = tiny_model("llama")
    assert embedding_rows(model) == VOCAB_SIZE
    assert tokenizer_overflow(tiny_tokenizer(), embedding_rows(model)) is None


def test_a_tokenizer_with_ids_beyond_the_embedding_is_named_with_both_sizes() -> None:
    problem = tokenizer_overflow(tiny_tokenizer(), 32)
    assert "token ids up to 63 (64 ids)" in problem and "embedding has 32 rows" in problem


def test_the_prune_warning_is_silent_without_a_tokenizer_or_when_it_fits(
    capsys: pytest.CaptureFixture,
) -> None:
    warn_if_tokenizer_overflows(None, 32, "m")
    warn_if_tokenizer_overflows(tiny_tokenizer(), 64, "m")
    assert capsys.readouterr().err == ""
