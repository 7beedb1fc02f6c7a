"""`PruneNet/Strategy-v0`: API conformance, episode shape, the reward is the measured KL."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs
from envs.strategy import StrategyEnv
from prunenet.allocation.strategy import (
    STRUCTURES,
    StrategyContext,
    observation_size,
    realise,
    uniform_actions,
)
from prunenet.errors import PruneNetError
from tests.conftest import ROOMY_GQA, start_token_text, tiny_model


@pytest.fixture(scope="module")
def context() -> StrategyContext:
    return StrategyContext(tiny_model("llama", **ROOMY_GQA), start_token_text())


def test_the_environment_passes_both_api_checkers(context) -> None:
    gym_check_env(StrategyEnv(context), skip_render_check=True)
    sb3_check_env(StrategyEnv(context))


def test_gym_make_builds_it_from_the_registered_id(context) -> None:
    env = gym.make(envs.STRATEGY_ENV_ID, context=context)
    observation, _ = env.reset(seed=0)
    assert observation.shape == (observation_size(),)


@pytest.mark.parametrize("reward", ["kl", "log-kl"])
def test_one_episode_is_one_step_per_layer_paid_at_the_end_with_the_measured_kl(
    context, reward
) -> None:
    env = StrategyEnv(context, reward=reward)
    env.reset(seed=0, options={"budget": 0.2})
    rewards, terminated = [], False
    while not terminated:
        _, value, terminated, truncated, info = env.step(np.zeros(3, dtype=np.float32))
        rewards.append(value)
        assert not truncated
    assert len(rewards) == 4 and rewards[:-1] == [0.0, 0.0, 0.0]
    uniform = realise(uniform_actions(4), 0.2, context.costs, STRUCTURES)
    kl = context.kl(uniform)
    assert info["kl"] == pytest.approx(kl, rel=1e-12)
    assert info["strategy"]["ffn_rows"] == uniform.ffn_rows
    assert rewards[-1] == pytest.approx(-kl if reward == "kl" else -math.log10(kl), rel=1e-12)


def test_the_budget_is_sampled_from_the_range_and_seen_in_every_observation(context) -> None:
    env = StrategyEnv(context, budget_range=(0.1, 0.3))
    budgets = set()
    for seed in range(5):
        observation, info = env.reset(seed=seed)
        assert 0.1 <= info["budget"] <= 0.3
        assert observation[-5] == pytest.approx(info["budget"])
        budgets.add(info["budget"])
    assert len(budgets) == 5


def test_earlier_proposals_show_in_later_observations(context) -> None:
    env = StrategyEnv(context)
    env.reset(seed=0, options={"budget": 0.2})
    first, *_ = env.step(np.array([1.0, 0.0, 0.0], dtype=np.float32))
    env.reset(seed=0, options={"budget": 0.2})
    other, *_ = env.step(np.array([-1.0, 0.0, 0.9], dtype=np.float32))
    assert not np.array_equal(first, other)


@pytest.mark.parametrize(
    "kwargs", [{"budget_range": (0.0, 0.3)}, {"budget_range": (0.4, 0.2)}, {"reward": "ppl"}]
)
def test_bad_settings_are_refused(context, kwargs) -> None:
    with pytest.raises(PruneNetError):
        StrategyEnv(context, **kwargs)


def test_a_range_beyond_what_the_ffn_can_give_is_refused_with_the_reach(context) -> None:
    # Gemma-3-270M's FFN rows are 26% of it: the default 5-35% range would crash its episodes.
    with pytest.raises(PruneNetError, match=r"FFN rows can give at most \d+\.\d%"):
        StrategyEnv(context, budget_range=(0.05, 0.95))


def test_on_the_ramp_base_both_api_checkers_pass(context) -> None:
    gym_check_env(StrategyEnv(context, base="ramp"), skip_render_check=True)
    sb3_check_env(StrategyEnv(context, base="ramp"))


@pytest.mark.parametrize("reward", ["kl", "log-kl"])
def test_on_the_ramp_base_zero_actions_repeat_the_best_ramp_and_are_paid_nothing(
    context, reward
) -> None:
    env = StrategyEnv(context, base="ramp", reward=reward, structures=("ffn",))
    observation, info = env.reset(seed=0, options={"budget": 0.2})
    ramp = context.best_ramp(0.2)
    assert observation.shape == (observation_size("ramp"),)
    assert observation[-1] == pytest.approx(ramp.extra["slope"])
    terminated = False
    while not terminated:
        _, value, terminated, _, info = env.step(np.zeros(3, dtype=np.float32))
    assert info["strategy"]["ffn_rows"] == ramp.ffn_rows
    assert info["kl"] == pytest.approx(ramp.kl, rel=1e-12)
    assert value == pytest.approx(0.0, abs=1e-12)


def test_on_the_ramp_base_a_worse_cut_is_paid_its_loss_against_the_ramp(context) -> None:
    env = StrategyEnv(context, base="ramp", structures=("ffn",))
    env.reset(seed=0, options={"budget": 0.2})
    terminated, step = False, 0
    while not terminated:  # everything from the first layer, nothing from the others
        action = np.array([1.0 if step == 0 else -1.0, 0.0, 0.0], dtype=np.float32)
        _, value, terminated, _, info = env.step(action)
        step += 1
    ramp = context.best_ramp(0.2)
    assert info["kl"] != ramp.kl
    assert value == pytest.approx(math.log10(ramp.kl) - math.log10(info["kl"]), rel=1e-12)


def test_on_the_ramp_base_budgets_are_drawn_on_the_grid_inside_the_range(context) -> None:
    env = StrategyEnv(context, budget_range=(0.1, 0.3), base="ramp")
    for seed in range(6):
        _, info = env.reset(seed=seed)
        assert 0.1 <= info["budget"] <= 0.3
        assert info["budget"] == round(info["budget"], 2)


def test_an_unknown_base_is_refused(context) -> None:
    with pytest.raises(PruneNetError, match="Unknown strategy base"):
        StrategyEnv(context, base="greedy")
