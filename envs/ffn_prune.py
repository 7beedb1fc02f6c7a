"""`PruneNet/FFNPrune-v0`: prune one FFN layer per step, walking a model's layers.

An episode samples a target ratio from `ratio_range` (and a model, when several are given) and
visits every layer in order. The observation is the layer's per-row features plus two context
columns (ratio, relative depth); the action is one score per row; the environment keeps the top
`round((1 - ratio) * d_ff)` rows and pays the chosen reward (`prunenet.rl.rewards`). Features are
computed once at construction, so a step costs only the reward.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from prunenet.analysis.features import LayerData, feature_names, model_layer_data
from prunenet.analysis.refit_statistics import refit_text
from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.core.compress import select_keep_indices
from prunenet.core.ratios import keep_count, validate_ratio_range
from prunenet.errors import PruneNetError
from prunenet.rl.observation import observation_for, spaces_for
from prunenet.rl.rewards import NEEDS_ACTIVATIONS, NEEDS_REFIT_STATISTICS, reward_function


class FFNPruneEnv(gym.Env):
    """Gymnasium environment over the FFN layers of one or more same-width models.

    :param model: a loaded model or a model spec (folder, hub id, alias); ignored when
        `layer_data` is given.
    :param layer_data: precomputed `model_layer_data` per model (lists of equal FFN width).
    :param feature_set: `selfgen` or `weights` (see `prunenet.analysis.features`).
    :param reward: `function`, `refit` or `ks` (see `prunenet.rl.rewards`).
    :param ratio_range: (low, high) of the per-episode target ratio.
    :param seed: self-generation seed when features are computed here.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        model=None,
        layer_data: list[list[LayerData]] | None = None,
        feature_set: str = "selfgen",
        reward: str = "function",
        ratio_range: tuple[float, float] = (0.1, 0.5),
        seed: int = 0,
        render_mode: str | None = None,
    ) -> None:
        self.reward_name = reward
        self._reward = reward_function(reward)
        self.feature_set = feature_set
        self.ratio_range = validate_ratio_range(ratio_range)
        if layer_data is None:
            if model is None:
                raise PruneNetError("FFNPruneEnv needs a model or precomputed layer_data.")
            layer_data = [load_layer_data(model, feature_set, reward, seed)]
        self.models = layer_data
        widths = {layer.ffn.width for layers in layer_data for layer in layers}
        if not layer_data or not all(layer_data) or len(widths) != 1:
            raise PruneNetError(
                "FFNPruneEnv needs at least one model with FFN layers, all of one FFN width "
                f"(got widths {sorted(widths)})."
            )
        self.width = widths.pop()
        layers = [layer for layers in layer_data for layer in layers]
        if any(layer.features.shape[1] != len(feature_names(feature_set)) for layer in layers):
            raise PruneNetError(
                f"layer_data was not computed with the {feature_set!r} feature set: pass the "
                "same feature_set to model_layer_data and FFNPruneEnv."
            )
        if reward in NEEDS_ACTIVATIONS and any(layer.activations is None for layer in layers):
            raise PruneNetError(
                f"The {reward!r} reward needs self-generated activations: compute layer_data "
                "with model_layer_data(..., collect=True)."
            )
        if reward in NEEDS_REFIT_STATISTICS and any(layer.refit is None for layer in layers):
            raise PruneNetError(
                f"The {reward!r} reward needs refit statistics: compute layer_data with "
                "model_layer_data(..., refit_text=refit_text(seed))."
            )
        self.observation_space, self.action_space = spaces_for(self.width, feature_set)
        self.render_mode = render_mode
        self._layers: list[LayerData] = layer_data[0]
        self._layer_index = 0
        self._ratio = self.ratio_range[0]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        low, high = self.ratio_range
        self._ratio = float(options.get("ratio", self.np_random.uniform(low, high)))
        self._layers = self.models[int(self.np_random.integers(len(self.models)))]
        self._layer_index = 0
        return self._observation(), {"ratio": self._ratio}

    def step(self, action):
        layer = self._layers[self._layer_index]
        scores = torch.as_tensor(np.asarray(action, dtype=np.float32).reshape(-1))
        keep = select_keep_indices(scores, keep_count(self.width, self._ratio))
        reward = float(self._reward(layer, keep))
        info = {"layer": self._layer_index, "ratio": self._ratio, "reward": reward}
        self._layer_index += 1
        terminated = self._layer_index == len(self._layers)
        observation = self._observation() if not terminated else self._terminal_observation()
        return observation, reward, terminated, False, info

    def _observation(self) -> np.ndarray:
        layer = self._layers[self._layer_index]
        depth = self._layer_index / max(len(self._layers) - 1, 1)
        return observation_for(layer.features, self._ratio, depth)

    def _terminal_observation(self) -> np.ndarray:
        return np.zeros(self.observation_space.shape, dtype=np.float32)


def load_layer_data(model, feature_set: str, reward: str, seed: int) -> list[LayerData]:
    """Layer data for a model object or spec, with the activations or refit statistics the
    reward needs."""
    if isinstance(model, str):
        from prunenet.io.models import load_model

        model, _ = load_model(model)
    return model_layer_data(
        model,
        feature_set,
        SelfGenConfig(seed=seed),
        collect=reward in NEEDS_ACTIVATIONS,
        refit_text=refit_text(seed) if reward in NEEDS_REFIT_STATISTICS else None,
    )
