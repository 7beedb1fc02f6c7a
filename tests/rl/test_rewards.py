"""Rewards for a row selection: function preservation (default), the same after the refit,
and the paper's 1/KS."""

from __future__ import annotations

import pytest
import torch

from prunenet.analysis.features import model_layer_data
from prunenet.analysis.selfgen import SelfGenConfig, own_text
from prunenet.analysis.spectral import ks_reward
from prunenet.core.refit import DEFAULT_RIDGE, output_error, refit_output
from prunenet.errors import PruneNetError
from prunenet.rl.rewards import (
    REWARDS,
    function_reward,
    refit_reward,
    reward_function,
    spectral_reward,
)
from tests.analysis.test_refit_statistics import dense_activations
from tests.conftest import FFN_WIDTH, tiny_model
from tests.conftest import SMALL_SELFGEN as SMALL

REFIT_TEXT = SelfGenConfig(sequences=8, length=16, seed=0)  # the last 2 sequences held out

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


def test_refit_reward_is_one_minus_the_held_out_error_of_refit_output_over_the_energy() -> None:
    model = tiny_model("llama")
    layer = model_layer_data(model, "selfgen", SMALL, refit_text=REFIT_TEXT)[0]
    layer.refit.ridge = DEFAULT_RIDGE  # refit_output without held-out rows fits with this one
    acts = dense_activations(model, own_text(model, REFIT_TEXT))[0]
    # As SequentialCut does: the start token's row is anchored, the others fit or held out.
    anchor, rows = acts[0, 0], acts[:, 1:]
    fit, held = rows[:-2].reshape(-1, FFN_WIDTH), rows[-2:].reshape(-1, FFN_WIDTH)
    weight = layer.ffn.output.double()
    keep = torch.tensor([0, 1, 4, 5, 6, 9, 10, 13, 15, 16, 19, 20, 22])
    result = refit_output(weight, None, keep, fit, held=None, mode="lsq", intercept=True,
                          anchor=(anchor, anchor @ weight.T))  # fmt: skip
    error = output_error(weight, None, keep, held, result.weight, result.bias)
    energy = float((held @ weight.T).pow(2).mean())
    assert refit_reward(layer, keep) == pytest.approx(1.0 - error / energy, abs=1e-6)


def test_refit_reward_forgives_removing_a_duplicated_neuron_which_function_punishes() -> None:
    model = tiny_model("llama", num_hidden_layers=1)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():  # neuron 1 computes exactly what neuron 0 computes
        mlp.gate_proj.weight[1] = mlp.gate_proj.weight[0]
        mlp.up_proj.weight[1] = mlp.up_proj.weight[0]
    layer = model_layer_data(model, "selfgen", SMALL, refit_text=REFIT_TEXT)[0]

    def without(row: int) -> torch.Tensor:
        return torch.tensor([r for r in range(FFN_WIDTH) if r != row])

    others = range(2, FFN_WIDTH)
    cheapest_other = max(others, key=lambda row: refit_reward(layer, without(row)))
    # The refit moves neuron 1's output column onto neuron 0: removing it is the cheapest cut.
    assert refit_reward(layer, without(1)) > refit_reward(layer, without(cheapest_other))
    # Without the refit its whole contribution is lost, so `function` ranks the two the other way.
    assert function_reward(layer, without(1)) < function_reward(layer, without(cheapest_other))


def test_refit_reward_without_refit_statistics_is_refused(layer) -> None:
    with pytest.raises(PruneNetError, match="needs refit statistics"):
        refit_reward(layer, torch.arange(4))


def test_spectral_reward_is_the_papers_one_over_ks_on_every_input_projection(layer) -> None:
    keep = torch.arange(0, FFN_WIDTH, 3)
    assert len(layer.ffn.inputs) == 2  # llama: gate and up
    assert spectral_reward(layer, keep) == ks_reward(layer.ffn.inputs, keep)


def test_reward_function_looks_rewards_up_by_name() -> None:
    assert set(REWARDS) == {"function", "refit", "ks"}
    assert reward_function("function") is function_reward
    assert reward_function("refit") is refit_reward
    assert reward_function("ks") is spectral_reward


def test_unknown_reward_is_refused_with_the_known_ones_listed() -> None:
    with pytest.raises(PruneNetError, match="Unknown reward 'ppl'.*function.*refit.*ks"):
        reward_function("ppl")
