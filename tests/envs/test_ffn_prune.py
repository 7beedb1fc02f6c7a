"""`PruneNet/FFNPrune-v0`: API conformance, seeding, episode shape, rewards and refusals."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs
from envs.ffn_prune import FFNPruneEnv
from prunenet.analysis.features import CONTEXT_FEATURES, feature_names, model_layer_data
from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.errors import PruneNetError
from tests.conftest import FFN_WIDTH, NUM_LAYERS, tiny_model
from tests.conftest import SMALL_SELFGEN as SMALL

pytestmark = pytest.mark.usefixtures("no_disk_cache")


@pytest.fixture(scope="module")
def layer_data():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNENET_NO_CACHE", "1")
        return model_layer_data(tiny_model("llama", num_hidden_layers=3), "selfgen", SMALL)


@pytest.fixture(scope="module")
def refit_layer_data():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNENET_NO_CACHE", "1")
        model = tiny_model("llama", num_hidden_layers=3)
        text = SelfGenConfig(sequences=8, length=16, seed=0)
        return model_layer_data(model, "selfgen", SMALL, refit_text=text)


def _env(layer_data, **kwargs) -> FFNPruneEnv:
    return FFNPruneEnv(layer_data=[layer_data], **kwargs)


def _run_episode(env: FFNPruneEnv, policy, ratio: float) -> list[tuple]:
    """(reward, terminated, truncated, info) per step of one episode at `ratio`;
    `policy(layer_index)` gives the action."""
    env.reset(seed=0, options={"ratio": ratio})
    steps, terminated = [], False
    while not terminated:
        _, reward, terminated, truncated, info = env.step(policy(len(steps)))
        steps.append((reward, terminated, truncated, info))
    return steps


# ----- API conformance ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*symmetric and normalized space")
def test_gymnasium_check_env_passes(layer_data) -> None:
    gym_check_env(_env(layer_data), skip_render_check=True)


def test_stable_baselines3_check_env_passes(layer_data) -> None:
    sb3_check_env(_env(layer_data), warn=False)


@pytest.mark.filterwarnings("ignore:.*symmetric and normalized space")
def test_check_env_passes_with_the_refit_reward(refit_layer_data) -> None:
    gym_check_env(_env(refit_layer_data, reward="refit"), skip_render_check=True)
    sb3_check_env(_env(refit_layer_data, reward="refit"), warn=False)


def test_gym_make_builds_the_env_from_a_model_object() -> None:
    env = gym.make(f"envs:{envs.ENV_ID}", model=tiny_model("llama"))
    observation, info = env.reset(seed=0)
    columns = len(feature_names("selfgen")) + len(CONTEXT_FEATURES)
    assert observation.shape == (FFN_WIDTH, columns)
    assert env.observation_space.contains(observation)
    assert 0.1 <= info["ratio"] <= 0.5
    env.close()


def test_spaces_follow_the_ffn_width_and_feature_set(layer_data) -> None:
    weights_data = model_layer_data(tiny_model("llama", intermediate_size=40), "weights", SMALL)
    env = FFNPruneEnv(layer_data=[weights_data], feature_set="weights", reward="ks")
    assert env.observation_space.shape == (40, len(feature_names("weights")) + 2)
    assert env.action_space.shape == (40,)
    assert _env(layer_data).action_space.shape == (FFN_WIDTH,)


# ----- seeding and episodes ----------------------------------------------------------------------


def test_reset_with_a_seed_is_reproducible(layer_data) -> None:
    first, second = _env(layer_data), _env(layer_data)
    observation_a, info_a = first.reset(seed=7)
    observation_b, info_b = second.reset(seed=7)
    assert info_a["ratio"] == info_b["ratio"]
    assert np.array_equal(observation_a, observation_b)
    action = np.linspace(-1, 1, FFN_WIDTH, dtype=np.float32)
    assert np.array_equal(first.step(action)[0], second.step(action)[0])
    assert first.reset()[1]["ratio"] == second.reset()[1]["ratio"]  # the seeded stream goes on


def test_different_seeds_give_different_ratios(layer_data) -> None:
    env = _env(layer_data)
    ratios = {env.reset(seed=seed)[1]["ratio"] for seed in range(5)}
    assert len(ratios) == 5
    assert all(0.1 <= ratio <= 0.5 for ratio in ratios)


def test_an_episode_has_one_step_per_layer(layer_data) -> None:
    steps = _run_episode(_env(layer_data), lambda index: np.zeros(FFN_WIDTH, np.float32), 0.3)
    assert len(steps) == len(layer_data)
    assert [info["layer"] for *_, info in steps] == list(range(len(layer_data)))
    assert [terminated for _, terminated, _, _ in steps] == [False] * (len(layer_data) - 1) + [True]
    assert not any(truncated for _, _, truncated, _ in steps)


def test_observation_carries_the_ratio_and_depth_context(layer_data) -> None:
    env = _env(layer_data)
    observation, _ = env.reset(seed=0, options={"ratio": 0.25})
    depths = []
    for index in range(len(layer_data)):
        assert np.allclose(observation[:, :-2], layer_data[index].features.numpy())
        assert np.all(observation[:, -2] == np.float32(0.25))
        depths.append(float(observation[0, -1]))
        observation, *_ = env.step(np.zeros(FFN_WIDTH, np.float32))
    assert depths == pytest.approx([0.0, 0.5, 1.0])


def test_observations_are_fresh_arrays(layer_data) -> None:
    env = _env(layer_data)
    observation, _ = env.reset(seed=0)
    observation[:] = 123.0
    again, _ = env.reset(seed=0)
    assert not np.any(again == 123.0)
    assert torch.all(layer_data[0].features != 123.0)


def test_keeping_the_selfgen_best_rows_beats_keeping_the_worst_rows(layer_data) -> None:
    def selfgen_scores(index: int) -> np.ndarray:
        layer = layer_data[index]
        return (layer.activations.rms * layer.ffn.output.norm(dim=0)).numpy()

    env = _env(layer_data)
    best = _run_episode(env, selfgen_scores, 0.5)
    worst = _run_episode(env, lambda index: -selfgen_scores(index), 0.5)
    for (good, *_), (bad, *_) in zip(best, worst, strict=True):
        assert good > bad


def test_a_model_is_drawn_per_episode_from_several(layer_data) -> None:
    other = model_layer_data(tiny_model("llama", seed=99, num_hidden_layers=2), "selfgen", SMALL)
    env = FFNPruneEnv(layer_data=[layer_data, other])
    lengths = set()
    for seed in range(12):
        steps = 0
        env.reset(seed=seed)
        while not env.step(np.zeros(FFN_WIDTH, np.float32))[2]:
            steps += 1
        lengths.add(steps + 1)
    assert lengths == {3, NUM_LAYERS}


# ----- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio_range", "message"),
    [
        ((0.5, 0.1), "is empty: low must be <= high"),
        ((0.0, 0.5), "outside \\(0, 1\\)"),
        ((0.2, 1.0), "outside \\(0, 1\\)"),
        (("abc", 0.5), "not a number"),
        ((0.1,), "Invalid ratio range"),
    ],
)
def test_a_bad_ratio_range_is_refused(layer_data, ratio_range, message: str) -> None:
    with pytest.raises(PruneNetError, match=message):
        _env(layer_data, ratio_range=ratio_range)


@pytest.mark.parametrize("models", [[[]], []])
def test_a_model_without_layers_is_refused(models) -> None:
    with pytest.raises(PruneNetError, match="at least one model with FFN layers"):
        FFNPruneEnv(layer_data=models)


def test_models_of_different_ffn_widths_are_refused(layer_data) -> None:
    wider = model_layer_data(tiny_model("llama", intermediate_size=40), "selfgen", SMALL)
    with pytest.raises(PruneNetError, match="all of one FFN width.*24, 40"):
        FFNPruneEnv(layer_data=[layer_data, wider])


def test_neither_model_nor_layer_data_is_refused() -> None:
    with pytest.raises(PruneNetError, match="needs a model or precomputed layer_data"):
        FFNPruneEnv()


def test_layer_data_of_another_feature_set_is_refused(layer_data) -> None:
    with pytest.raises(PruneNetError, match="not computed with the 'weights' feature set"):
        _env(layer_data, feature_set="weights", reward="ks")


def test_function_reward_without_activations_is_refused_at_construction() -> None:
    weights_only = model_layer_data(tiny_model("llama"), "weights", SMALL)
    with pytest.raises(PruneNetError, match="needs self-generated activations"):
        FFNPruneEnv(layer_data=[weights_only], feature_set="weights", reward="function")


def test_refit_reward_without_refit_statistics_is_refused_at_construction(layer_data) -> None:
    with pytest.raises(PruneNetError, match="needs refit statistics"):
        _env(layer_data, reward="refit")


def test_an_unknown_reward_is_refused(layer_data) -> None:
    with pytest.raises(PruneNetError, match="Unknown reward"):
        _env(layer_data, reward="perplexity")
