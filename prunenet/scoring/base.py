"""The scorer interface: how important is each FFN neuron (higher = keep).

A scorer only answers that question; which neurons go for a ratio is `prunenet.core.compress`'s
job, and how many per layer is `prunenet.allocation`'s. Weights-only scorers implement
`score_layer`, which sees one layer's FFN at a time, so the streaming pruner can use them
without loading the whole model. Scorers that need the model's forward pass override
`score_model`. New criteria are one small subclass (`prunenet.scoring.heuristics`, the policy
scorers in `prunenet.rl`), registered by name in `prunenet.scoring.registry`.
"""

from __future__ import annotations

import torch
from torch import nn

from prunenet.analysis.selfgen import LayerActivations
from prunenet.core.arch import FFNWeights, adapter_for, decoder_layers
from prunenet.core.surgery import ffn_weights
from prunenet.errors import PruneNetError


class Scorer:
    """Base class. Subclasses set `name` and implement `score_layer` or `score_model`."""

    name: str = "base"
    weights_only: bool = True
    # Whether scores depend on the target ratio (a policy observes it): callers that prune at
    # several ratios must then score once per ratio instead of reusing one ranking.
    ratio_aware: bool = False

    def score_layer(
        self, ffn: FFNWeights, layer_index: int, num_layers: int, ratio: float | None = None
    ) -> torch.Tensor:
        """Scores of one layer's rows. `ratio` is the target ratio, for scorers that use it."""
        raise NotImplementedError

    def score_model(self, model: nn.Module, ratio: float | None = None) -> list[torch.Tensor]:
        """One score vector per decoder layer (length d_ff each)."""
        adapter = adapter_for(model.config)
        layers = decoder_layers(model)
        return [
            self.score_layer(ffn_weights(layer, adapter), index, len(layers), ratio)
            for index, layer in enumerate(layers)
        ]

    def score_activations(
        self,
        ffn: FFNWeights,
        activations: LayerActivations,
        layer_index: int,
        num_layers: int,
        ratio: float | None = None,
    ) -> torch.Tensor:
        """Scores of one layer's rows given its activations on self-generated text.

        Sequential analysis (`prunenet.analysis.sequential`) calls this with the activations the
        layer sees once the layers before it are cut, instead of the dense model's. A
        weights-only scorer ignores them.

        :param ffn: the layer's neuron-first FFN weights.
        :param activations: the layer's activation statistics.
        :param layer_index: which decoder layer.
        :param num_layers: how many there are.
        :param ratio: the target ratio, for scorers that observe it.
        """
        if self.weights_only:
            return self.score_layer(ffn, layer_index, num_layers, ratio)
        raise PruneNetError(f"Scorer {self.name!r} cannot score from given activations.")

    def describe(self) -> dict:
        """What to record next to results so they can be reproduced."""
        return {"scorer": self.name}
