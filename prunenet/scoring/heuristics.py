"""Hand-made importance scorers: one small class per criterion, higher score = keep the neuron.

A scorer only answers "how important is each FFN neuron"; which neurons to drop for a ratio is
the compressor's job (`prunenet.core.compress`). Weights-only scorers implement `score_layer`, which
sees one layer's FFN at a time, so the streaming pruner can use them without loading the whole
model. Scorers that need the model's forward pass override `score_model` instead.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from prunenet.analysis.selfgen import LayerActivations, SelfGenConfig, collect_activations
from prunenet.core.arch import FFNWeights, adapter_for, decoder_layers
from prunenet.core.surgery import ffn_weights
from prunenet.scoring.base import Scorer


class MagnitudeScorer(Scorer):
    """L2 norm of each neuron's weights across all FFN input projections (gate and up, or fc1).

    The classic structured-pruning baseline; the paper compares against it.
    """

    name = "magnitude"

    def score_layer(
        self, ffn: FFNWeights, layer_index: int, num_layers: int, ratio: float | None = None
    ) -> torch.Tensor:
        squared = sum(w.float().pow(2).sum(dim=1) for w in ffn.inputs)
        return squared.sqrt()


class RandomScorer(Scorer):
    """Uniform random scores, reproducible from `seed` (the same seed gives the same pruning)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def score_layer(
        self, ffn: FFNWeights, layer_index: int, num_layers: int, ratio: float | None = None
    ) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + layer_index)
        return torch.rand(ffn.width, generator=generator)

    def describe(self) -> dict:
        return {"scorer": self.name, "seed": self.seed}


class SelfGenScorer(Scorer):
    """sqrt(mean squared activation) x down-projection column norm, on self-generated text.

    The strong data-free baseline (docs/architecture.md, "Findings"): the expected size of each
    neuron's contribution to the FFN output, measured on sequences the model sampled from its own
    start token.
    """

    name = "selfgen"
    weights_only = False

    def __init__(self, seed: int = 0) -> None:
        self.config = SelfGenConfig(seed=seed)

    def score_model(self, model: nn.Module, ratio: float | None = None) -> list[torch.Tensor]:
        adapter = adapter_for(model.config)
        activations = collect_activations(model, self.config)
        layers = decoder_layers(model)
        return [
            self.score_activations(ffn_weights(layer, adapter), acts, index, len(layers), ratio)
            for index, (acts, layer) in enumerate(zip(activations, layers, strict=True))
        ]

    def score_activations(
        self,
        ffn: FFNWeights,
        activations: LayerActivations,
        layer_index: int,
        num_layers: int,
        ratio: float | None = None,
    ) -> torch.Tensor:
        return activations.rms.cpu() * ffn.output.float().norm(dim=0).cpu()

    def describe(self) -> dict:
        return {"scorer": self.name, **asdict(self.config)}
