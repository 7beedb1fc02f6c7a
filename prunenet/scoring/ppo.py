"""Score FFN rows with a trained policy: the deterministic mean, never an RNG-dependent sample.

One checkpoint serves any ratio and any FFN width: the features of a model are computed once
(and the self-generated activations cached on disk), then every ratio costs one small forward
pass of the policy per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from prunenet.analysis.features import LayerData, layer_features, model_layer_data
from prunenet.analysis.selfgen import LayerActivations, SelfGenConfig
from prunenet.core.arch import FFNWeights
from prunenet.errors import PruneNetError
from prunenet.io.cache import weights_fingerprint
from prunenet.rl.checkpoint import read_metadata
from prunenet.rl.observation import observation_for
from prunenet.rl.ppo.checkpoint import load_policy
from prunenet.rl.ppo.policy import RowScoringPolicy
from prunenet.scoring.base import Scorer


class PolicyScorer(Scorer):
    """Scores from a `prunenet train` checkpoint.

    :param checkpoint: path of the policy zip.
    :param device: where the policy runs.
    """

    name = "policy"
    ratio_aware = True

    def __init__(self, checkpoint: str, device: str = "cpu") -> None:
        self.checkpoint = str(checkpoint)
        self.device = device
        self.metadata = read_metadata(checkpoint, "ppo")
        self.feature_set = self.metadata["feature_set"]
        self.weights_only = self.feature_set == "weights"
        # Read the weights now, so a damaged or unsafe checkpoint is refused before any model is
        # loaded; each FFN width then gets its own policy (the spaces differ, the weights not).
        self._policies: dict[int, RowScoringPolicy] = {1: load_policy(checkpoint, 1, device)[0]}
        # Features of the last model scored, keyed by its weights (not its id: a model pruned in
        # place, or a new one at a recycled address, must not reuse them).
        self._layer_data: tuple[str, list[LayerData]] | None = None

    def score_model(self, model: nn.Module, ratio: float | None = None) -> list[torch.Tensor]:
        layer_data = self._features(model)
        return [
            self._scores(layer.features, index, len(layer_data), ratio)
            for index, layer in enumerate(layer_data)
        ]

    def score_layer(
        self, ffn: FFNWeights, layer_index: int, num_layers: int, ratio: float | None = None
    ) -> torch.Tensor:
        if not self.weights_only:
            raise PruneNetError(
                f"Policy {self.checkpoint} uses {self.feature_set!r} features, which need the "
                "model's forward pass; it cannot score one layer at a time (streaming). Train "
                "a streamable policy with `prunenet train --features weights`."
            )
        features = layer_features(ffn, None, self.feature_set)
        return self._scores(features, layer_index, num_layers, ratio)

    def score_activations(
        self,
        ffn: FFNWeights,
        activations: LayerActivations,
        layer_index: int,
        num_layers: int,
        ratio: float | None = None,
    ) -> torch.Tensor:
        features = layer_features(ffn, activations, self.feature_set)
        return self._scores(features, layer_index, num_layers, ratio)

    def describe(self) -> dict:
        keys = ("algo", "feature_set", "reward", "ratios", "source_model", "seed", "step")
        return {"scorer": self.name, "checkpoint": self.checkpoint,
                **{k: self.metadata.get(k) for k in keys}}  # fmt: skip

    def _features(self, model: nn.Module) -> list[LayerData]:
        key = weights_fingerprint(model)
        if self._layer_data is None or self._layer_data[0] != key:
            seed = self.metadata.get("seed", 0)
            data = model_layer_data(model, self.feature_set, SelfGenConfig(seed=seed))
            self._layer_data = (key, data)
        return self._layer_data[1]

    def _scores(
        self, features: torch.Tensor, index: int, num_layers: int, ratio: float | None
    ) -> torch.Tensor:
        if ratio is None:
            raise PruneNetError("A policy scores rows for a target ratio; pass ratio=...")
        width = features.shape[0]
        if width not in self._policies:
            self._policies[width] = load_policy(self.checkpoint, width, self.device)[0]
        depth = index / max(num_layers - 1, 1)
        return self._policies[width].row_scores(observation_for(features, ratio, depth))
