"""Rewards for a row selection: function preservation (default) and the paper's 1/KS."""

from __future__ import annotations

import pytest
import torch

from prunenet.analysis.features import model_layer_data
from prunenet.analysis.spectral import ks_reward
from prunenet.errors import PruneNetError
from prunenet.rl.rewards import REWARDS, function_reward, reward_function, spectral_reward
from tests.conftest import FFN_WIDTH, tiny_model
from tests.conftest import SMALL_SELFGEN as SMALL

pytestmark = pytest.mark.usefixtures("no_disk_cache")


@pytest.fixture(scope="module")
def layer():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNENET_NO_CACHE", "1")
        return model_layer_data(tiny_model("llama"), "selfgen", SMALL)[0]


def test_function_reward_is_one_minus_the_relative_output_error(layer) -> None:
    keep = torch.arange(0, FFN_WIDTH, 2)
    sample, output = layer.activations.sample, layer.ffn.output.float()
    dense = sample @ output.T
    error = (dense - sample[:, keep] @ output[:, keep].T).pow(2).sum() / dense.pow(2).sum()
    assert function_reward(layer, keep) == pytest.approx(1.0 - float(error), rel=1e-5)


def test_function_reward_is_one_when_every_row_is_kept(layer) -> None:
    assert function_reward(layer, torch.arange(FFN_WIDTH)) == pytest.approx(1.0)


def test_function_reward_prefers_the_rows_with_the_largest_output_contribution(layer) -> None:
    contribution = layer.activations.rms * layer.ffn.output.norm(dim=0)
    order = torch.argsort(contribution, descending=True)
    best, worst = order[: FFN_WIDTH // 2].sort().values, order[FFN_WIDTH // 2 :].sort().values
    assert function_reward(layer, best) > function_reward(layer, worst)


def test_function_reward_without_activations_is_refused() -> None:
    layer = model_layer_data(tiny_model("llama"), "weights", SMALL)[0]
    with pytest.raises(PruneNetError, match="needs self-generated activations"):
        function_reward(layer, torch.arange(4))


def test_spectral_reward_is_the_papers_one_over_ks_on_every_input_projection(layer) -> None:
    keep = torch.arange(0, FFN_WIDTH, 3)
    assert len(layer.ffn.inputs) == 2  # llama: gate and up
    assert spectral_reward(layer, keep) == ks_reward(layer.ffn.inputs, keep)


def test_reward_function_looks_rewards_up_by_name() -> None:
    assert set(REWARDS) == {"function", "ks"}
    assert reward_function("function") is function_reward
    assert reward_function("ks") is spectral_reward


def test_unknown_reward_is_refused_with_the_known_ones_listed() -> None:
    with pytest.raises(PruneNetError, match="Unknown reward 'ppl'.*function.*ks"):
        reward_function("ppl")
