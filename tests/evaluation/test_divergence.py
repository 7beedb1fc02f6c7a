"""KL(dense || pruned) on the perplexity windows: zero for the same model, grows with pruning."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from prunenet.core.compress import prune_model
from prunenet.core.config_fields import ffn_widths
from prunenet.core.ratios import uniform_keep
from prunenet.evaluation.divergence import ReferenceCache, kl_and_perplexity, per_token_kl
from prunenet.evaluation.perplexity import perplexity, token_windows
from prunenet.scoring.registry import make_scorer
from tests.conftest import tiny_model, tiny_tokenizer

TEXT = " ".join(f"w{4 + (7 * i) % 60}" for i in range(64))


@pytest.fixture(scope="module")
def windows():
    return token_windows(tiny_tokenizer(), TEXT, 16, limit=None)


def _pruned(model, ratio: float):
    pruned = copy.deepcopy(model)
    scores = make_scorer("random", seed=0).score_model(pruned)
    prune_model(pruned, scores, uniform_keep(ffn_widths(pruned.config), ratio))
    return pruned


def test_kl_of_a_model_with_itself_is_exactly_zero(windows):
    model = tiny_model("llama")
    kl, _ = kl_and_perplexity(model, model, windows)
    assert (kl.mean_kl, kl.max_kl) == (0.0, 0.0)
    assert kl.tokens == 4 * 16  # BOS prepended: every window token is scored


def test_kl_grows_with_the_pruning_ratio(windows):
    dense = tiny_model("llama")
    values = [kl_and_perplexity(dense, _pruned(dense, r), windows)[0].mean_kl for r in (0.25, 0.75)]
    assert 0 < values[0] < values[1]


def test_the_kl_pass_reports_the_same_perplexity_as_a_perplexity_run(windows):
    dense = tiny_model("llama")
    pruned = _pruned(dense, 0.5)
    _, ppl = kl_and_perplexity(dense, pruned, windows, batch_size=3)
    assert ppl.perplexity == pytest.approx(perplexity(pruned, windows).perplexity, rel=1e-6)
    assert ppl.scored_tokens == 64


def test_cached_reference_logits_give_the_same_kl_without_running_the_reference(windows):
    dense = tiny_model("llama")
    pruned = _pruned(dense, 0.5)
    cache = ReferenceCache()
    first, _ = kl_and_perplexity(dense, pruned, windows, cache=cache)

    class MustNotRun(torch.nn.Module):
        def forward(self, **kwargs):
            raise AssertionError("the cached reference ran again")

    again, _ = kl_and_perplexity(MustNotRun(), pruned, windows, cache=cache)
    assert again.mean_kl == first.mean_kl


def test_per_token_kl_matches_the_definition_for_two_known_distributions():
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert per_token_kl(p, q).item() == pytest.approx(expected, rel=1e-6)  # float32 inputs
