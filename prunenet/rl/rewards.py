"""Rewards: how good is keeping rows `keep` of one layer? Higher is better.

`function` (default): 1 - relative error of the FFN's output on the model's own generated text
when only `keep` survives. It tracks what the pruned model computes, which is what perplexity
measures. `refit`: the same question asked of the layer the pruner really ships when it refits:
1 - held-out squared error of the FFN output after a ridge refit of the kept output columns
(with an intercept where the architecture stores one) / held-out energy of the dense output
(`sum ||y||^2`, bias included; the same normaliser as `function`, so both read as "1 - relative
error" and compare across layers). Rows the kept ones can stand in for are then cheap to remove
(a duplicated neuron costs nothing), which `function` cannot see. The statistics are the dense
model's, on the prune-time refit's 64 x 128 self-generated tokens with the last quarter of the
sequences held out and the start token's row anchored as `SequentialCut` anchors it (reproduced
exactly, left out of the fit and of the error); each layer's ridge is chosen once on the held-out
rows (`prunenet.analysis.refit_statistics`).
`ks`: the paper's 1/KS between singular-value spectra before and after, kept for comparison; on
SmolLM2 the selection with the best spectrum had worse perplexity than random.
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


def refit_reward(layer: LayerData, keep: torch.Tensor) -> float:
    if layer.refit is None:
        raise PruneNetError(
            "The refit reward needs refit statistics: compute layer data with "
            "model_layer_data(..., refit_text=refit_text(seed))."
        )
    return 1.0 - layer.refit.held_error(keep)


def spectral_reward(layer: LayerData, keep: torch.Tensor) -> float:
    return ks_reward(layer.ffn.inputs, keep, layer.input_spectra)


REWARDS: dict[str, Callable[[LayerData, torch.Tensor], float]] = {
    "function": function_reward,
    "refit": refit_reward,
    "ks": spectral_reward,
}
NEEDS_ACTIVATIONS = {"function"}
NEEDS_REFIT_STATISTICS = {"refit"}


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
