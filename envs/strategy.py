"""`PruneNet/Strategy-v0`: decide how much to cut from each layer, one layer per step.

An episode is one request: a parameter budget sampled from `budget_range`. Step t shows layer
t's data-free descriptors with the request and what the episode has proposed so far
(`prunenet.allocation.strategy.observe`), and takes three numbers in [-1, 1] for that layer: FFN
weight exponent, head level, drop level (`realise` explains them). After the last layer the
proposals are rescaled to meet the budget exactly and the reward is minus the KL(dense ||
pruned) on held-out self-generated text, measured with masks: one forward pass per episode,
zero reward before. Discount 1 over layers: the layers interact, only the whole cut counts.

`reward="log-kl"` pays -log10(KL) - the same ordering, but a step from 0.2 to 0.1 weighs as
much as one from 2 to 1, so small and large budgets train alike.

`base="ramp"`: the actions correct the request's best depth ramp (`StrategyContext.best_ramp`,
`on_base`) instead of standing alone, the observation adds the ramp's slope, and the reward is
what the episode gains over that ramp (log10 KL of the ramp - log10 KL of the episode, or the
KL difference with `reward="kl"`): zero for repeating the rule, positive only for beating it.
Budgets are drawn on a grid of `BUDGET_GRID` so each one's ramp is measured once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import gymnasium as gym
import numpy as np

from prunenet.allocation.strategy import (
    STRUCTURES,
    Strategy,
    StrategyContext,
    check_base,
    observation_size,
    observe,
    on_base,
    realise,
)
from prunenet.allocation.structures import reachable_parameters
from prunenet.errors import PruneNetError

REWARDS = ("kl", "log-kl")
BUDGET_GRID = 0.01  # on the ramp base, requests are drawn in steps of this


class StrategyEnv(gym.Env):
    """Gymnasium environment whose episodes are per-layer strategies for one request.

    :param context: the model's `StrategyContext` (descriptors, masked KL); build it once and
        share it between environments.
    :param budget_range: (low, high) of the per-episode fraction of parameters to remove.
    :param structures: which structures the actions may cut (ffn required).
    :param reward: `kl` (-KL) or `log-kl` (-log10 KL).
    :param base: `uniform` (the actions are the strategy) or `ramp` (they correct the request's
        best depth ramp, and the reward is the gain over it).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        context: StrategyContext,
        budget_range: tuple[float, float] = (0.05, 0.35),
        structures: Sequence[str] = STRUCTURES,
        reward: str = "log-kl",
        render_mode: str | None = None,
        base: str = "uniform",
    ) -> None:
        low, high = budget_range
        if not 0 < low <= high < 1:
            raise PruneNetError(
                f"budget_range must satisfy 0 < low <= high < 1, got {budget_range}."
            )
        if reward not in REWARDS:
            raise PruneNetError(f"Unknown reward {reward!r}; choose {' or '.join(REWARDS)}.")
        if context.descriptors is None:
            raise PruneNetError("StrategyEnv needs a StrategyContext built with describe=True.")
        # The FFN fills whatever drops and heads leave (`realise`), so a request the FFN rows
        # alone cannot meet could crash an episode (Gemma-3-270M: 23.8%, its embeddings are 62%).
        reach = reachable_parameters(context.costs, ("ffn",)) / context.costs.dense
        if high > reach:
            raise PruneNetError(
                f"budget_range {budget_range} asks for up to {high:.0%} of the parameters, but "
                f"this model's FFN rows can give at most {reach:.1%}; lower the high end "
                f"(e.g. to {math.floor(100 * reach) / 100:.2f})."
            )
        self.base_name = check_base(base)
        self.context = context
        self.budget_range = (float(low), float(high))
        self.structures = tuple(structures)
        self.reward_name = reward
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (observation_size(base),),
                                                np.float32)  # fmt: skip
        self.action_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
        self.budget = low
        self._actions = np.zeros((context.layer_count, 3))
        self._step = 0
        self._base: Strategy | None = None
        self.last_strategy: Strategy | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        budget = (options or {}).get("budget")  # a request; else one drawn from the range
        if budget is None:
            budget = float(self.np_random.uniform(*self.budget_range))
            if self.base_name == "ramp":
                low, high = self.budget_range
                budget = min(max(round(budget / BUDGET_GRID) * BUDGET_GRID, low), high)
                budget = round(budget, 6)  # 0.07 and not 0.07000000000000001: one memo entry
        self.budget = float(budget)
        self._actions = np.zeros((self.context.layer_count, 3))
        self._step = 0
        self._base = self.context.best_ramp(self.budget) if self.base_name == "ramp" else None
        return self._observation(), {"budget": self.budget}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(3), -1.0, 1.0)
        self._actions[self._step] = action
        self._step += 1
        if self._step < self.context.layer_count:
            return self._observation(), 0.0, False, False, {}
        strategy = realise(on_base(self._actions, self._base), self.budget, self.context.costs,
                           self.structures, source="policy")  # fmt: skip
        strategy.kl = self.context.kl(strategy)
        self.last_strategy = strategy
        reward = self._paid(strategy.kl)
        if self._base is not None:  # the gain over the best ramp: 0 for repeating the rule
            reward -= self._paid(self._base.kl)
        # The terminal observation is never acted on; the last layer's is repeated.
        self._step -= 1
        observation = self._observation()
        self._step += 1
        info = {"kl": strategy.kl, "strategy": strategy.to_dict()}
        return observation, float(reward), True, False, info

    def _paid(self, kl: float) -> float:
        return -kl if self.reward_name == "kl" else -math.log10(max(kl, 1e-8))

    def _observation(self) -> np.ndarray:
        slope = None if self._base is None else self._base.extra["slope"]
        return observe(self.context, self.budget, self._actions, self._step, slope)
