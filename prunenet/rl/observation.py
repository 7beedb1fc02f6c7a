"""What a row-scoring policy sees: one layer's row features plus (ratio, depth) context columns.

Shared by the Gymnasium environment (`envs.ffn_prune`), the PPO trainer and the policy scorer,
so training and pruning build observations the same way. It lives in `prunenet` because the
library scores rows at prune time; `envs` imports it, never the reverse.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from prunenet.analysis.features import CONTEXT_FEATURES, feature_names

# Wide finite bounds: check_env wants finite Boxes, and clipping to them must never create ties.
BOUND = 1e6


def observation_for(features: torch.Tensor, ratio: float, depth: float) -> np.ndarray:
    """Row features plus the (ratio, depth) context columns, as a fresh float32 array.

    :param features: `rows x features` of one layer.
    :param ratio: the target ratio.
    :param depth: the layer's relative depth, 0 (first) to 1 (last).
    """
    rows = features.shape[0]
    context = torch.tensor([ratio, depth], dtype=torch.float32).expand(rows, 2)
    return torch.cat([features.float(), context], dim=1).numpy().copy()


def spaces_for(width: int, feature_set: str) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    """Observation and action spaces for an FFN of `width` rows.

    :param width: rows of the layer (d_ff).
    :param feature_set: the feature set's name (`prunenet.analysis.features.FEATURE_SETS`).
    """
    columns = len(feature_names(feature_set)) + len(CONTEXT_FEATURES)
    observation = gym.spaces.Box(-BOUND, BOUND, (width, columns), np.float32)
    action = gym.spaces.Box(-BOUND, BOUND, (width,), np.float32)
    return observation, action
