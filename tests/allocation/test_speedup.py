"""A speed target becomes the smallest FFN ratio timed at least that much faster."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from prunenet.allocation import speedup
from prunenet.allocation.speedup import check_target_speedup, ratio_for_speedup
from prunenet.errors import PruneNetError
from tests.conftest import FFN_WIDTH, tiny_model


@pytest.fixture
def linear_speed(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Timing replaced by speed-up = 1 + ratio, so the answer is known exactly."""
    shaped: list[float] = []
    real = speedup._shaped_like_cut

    def shape(model, ratio):
        shaped.append(ratio)
        return real(model, ratio)

    monkeypatch.setattr(speedup, "_shaped_like_cut", shape)
    monkeypatch.setattr(
        speedup,
        "compare_runners",
        lambda *args, **kwargs: SimpleNamespace(paired_speedup=1 + shaped[-1]),
    )
    return shaped


def test_the_smallest_ratio_at_or_above_the_target_is_found(linear_speed) -> None:
    search = ratio_for_speedup(tiny_model("llama"), 1.3)
    assert 0.3 <= search.ratio <= 0.3 + speedup.MAX_FFN_RATIO / 2**speedup.SEARCH_STEPS
    assert search.speedup == pytest.approx(1 + search.ratio)
    assert [ratio for ratio, _ in search.trials] == linear_speed
    assert search.trials[0][0] == speedup.MAX_FFN_RATIO


def test_an_unreachable_target_is_refused_after_one_trial(linear_speed) -> None:
    with pytest.raises(PruneNetError, match="gave a prefill speed-up of 1.90"):
        ratio_for_speedup(tiny_model("llama"), 2.5)
    assert linear_speed == [speedup.MAX_FFN_RATIO]


@pytest.mark.parametrize("target", [1.0, 0.8, float("nan")])
def test_a_target_must_be_a_real_speed_up(target: float) -> None:
    with pytest.raises(PruneNetError, match="must be above 1"):
        check_target_speedup(target)


def test_a_timing_copy_has_the_cut_shapes_and_leaves_the_model_alone() -> None:
    model = tiny_model("llama")
    before = [p.clone() for p in model.parameters()]
    shaped = speedup._shaped_like_cut(model, 0.5)
    assert [layer.mlp.down_proj.weight.shape[1] for layer in shaped.model.layers] == [
        FFN_WIDTH // 2
    ] * 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert shaped(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size
