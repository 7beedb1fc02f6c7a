"""Importance scorers: one small class per criterion, higher score = keep the neuron.

A scorer only answers "how important is each FFN neuron"; which neurons to drop for a ratio is
the compressor's job (`prunenet.core.compress`). Weights-only scorers implement `score_layer`, which
sees one layer's FFN at a time, so the streaming pruner can use them without loading the whole
model. Scorers that need the model's forward pass override `score_model` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from prunenet.analysis.selfgen import SelfGenConfig, collect_activations
from prunenet.core.arch import FFNWeights, adapter_for, decoder_layers, ffn_weights
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

    def describe(self) -> dict:
        """What to record next to results so they can be reproduced."""
        return {"scorer": self.name}


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

    The strong data-free baseline of DESIGN.md: the expected size of each neuron's contribution
    to the FFN output, measured on sequences the model sampled from its own start token.
    """

    name = "selfgen"
    weights_only = False

    def __init__(self, seed: int = 0) -> None:
        self.config = SelfGenConfig(seed=seed)

    def score_model(self, model: nn.Module, ratio: float | None = None) -> list[torch.Tensor]:
        adapter = adapter_for(model.config)
        activations = collect_activations(model, self.config)
        return [
            acts.rms * ffn_weights(layer, adapter).output.float().norm(dim=0).cpu()
            for acts, layer in zip(activations, decoder_layers(model), strict=True)
        ]

    def describe(self) -> dict:
        return {"scorer": self.name, **asdict(self.config)}


def _bundled_policy(seed: int) -> Scorer:
    from prunenet.rl.ppo.scorer import bundled_policy_scorer  # imports SB3: only when asked

    return bundled_policy_scorer(seed)


# CLI name -> factory taking the run's seed (scorers that ignore randomness ignore it).
SCORERS: dict[str, Callable[[int], Scorer]] = {
    MagnitudeScorer.name: lambda seed: MagnitudeScorer(),
    RandomScorer.name: RandomScorer,
    SelfGenScorer.name: SelfGenScorer,
    "policy": _bundled_policy,
}


def make_scorer(name: str, seed: int = 0) -> Scorer:
    """Build a scorer by its CLI name."""
    if name not in SCORERS:
        raise PruneNetError(f"Unknown scorer {name!r}. Choose one of: {', '.join(SCORERS)}.")
    return SCORERS[name](seed)
