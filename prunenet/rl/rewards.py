"""Rewards: how good is keeping rows `keep` of one layer? Higher is better.

`function` (default): 1 - relative error of the FFN's output on the model's own generated text
when only `keep` survives. It tracks what the pruned model computes, which is what perplexity
measures. `ks`: the paper's 1/KS between singular-value spectra before and after, kept for
comparison; on SmolLM2 the selection with the best spectrum had worse perplexity than random.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from prunenet.analysis.features import LayerData
from prunenet.analysis.spectral import function_error, ks_reward
from prunenet.core.compress import select_keep_indices
from prunenet.core.ratios import keep_count
from prunenet.errors import PruneNetError


def function_reward(layer: LayerData, keep: torch.Tensor) -> float:
    if layer.activations is None:
        raise PruneNetError("The function reward needs self-generated activations.")
    sample, output = layer.activations.sample, layer.ffn.output.float()
    return 1.0 - function_error(sample, output, keep, layer.output_energy)


def spectral_reward(layer: LayerData, keep: torch.Tensor) -> float:
    return ks_reward(layer.ffn.inputs, keep, layer.input_spectra)


REWARDS: dict[str, Callable[[LayerData, torch.Tensor], float]] = {
    "function": function_reward,
    "ks": spectral_reward,
}
NEEDS_ACTIVATIONS = {"function"}


def reward_function(name: str) -> Callable[[LayerData, torch.Tensor], float]:
    if name not in REWARDS:
        raise PruneNetError(f"Unknown reward {name!r}; choose one of {', '.join(REWARDS)}.")
    return REWARDS[name]


def mean_reward(
    layer_data: Sequence[LayerData],
    ratios: Sequence[float],
    reward: str,
    layer_scores: Callable[[int, LayerData, float], torch.Tensor],
) -> float:
    """How every trainer evaluates a policy: the mean reward of its deterministic top-k rows.

    :param layer_data: the layers of one model.
    :param ratios: target ratios to evaluate at (each layer is scored at each).
    :param reward: a name in `REWARDS`.
    :param layer_scores: `(layer index, layer data, ratio) -> row scores` of the policy.
    """
    reward_of = reward_function(reward)
    values = []
    for ratio in ratios:
        for index, layer in enumerate(layer_data):
            kept = keep_count(layer.ffn.width, ratio)
            values.append(
                reward_of(layer, select_keep_indices(layer_scores(index, layer, ratio), kept))
            )
    return float(np.mean(values))
