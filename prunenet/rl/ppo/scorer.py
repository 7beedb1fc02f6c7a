"""Score FFN rows with a trained policy: the deterministic mean, never an RNG-dependent sample.

One checkpoint serves any ratio and any FFN width: the features of a model are computed once
(and the self-generated activations cached on disk), then every ratio costs one small forward
pass of the policy per layer.

`load_scorer_from_checkpoint` picks the scorer from the checkpoint's metadata: `PolicyScorer`
for PPO checkpoints, `prunenet.rl.reinforce.train.ReinforceScorer` for the paper-faithful baseline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from envs.ffn_prune import observation_for
from prunenet.analysis.features import LayerData, layer_features, model_layer_data
from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.core.arch import FFNWeights
from prunenet.errors import PruneNetError
from prunenet.io.cache import weights_fingerprint
from prunenet.rl.ppo.policy import RowScoringPolicy, load_policy, read_metadata
from prunenet.scoring.heuristics import Scorer


def load_scorer_from_checkpoint(checkpoint: str, device: str = "cpu") -> Scorer:
    """The right scorer for a `prunenet train` checkpoint, by its metadata's `algo`.

    :param checkpoint: path of the zip; its metadata is validated first (`read_metadata`).
    :param device: where the policy runs.
    """
    algo = read_metadata(checkpoint)["algo"]
    if algo == "ppo":
        return PolicyScorer(checkpoint, device)
    if algo == "reinforce":
        from prunenet.rl.reinforce.train import ReinforceScorer

        return ReinforceScorer(checkpoint, device)
    raise PruneNetError(
        f"Checkpoint {checkpoint} was trained with algo {algo!r}, which this PruneNet cannot "
        "score with (known: ppo, reinforce). Re-train it with `prunenet train`."
    )


BUNDLED_POLICY = Path(__file__).resolve().parents[2] / "policies" / "smollm2-135m-ppo.zip"


def bundled_policy_scorer(seed: int = 0) -> Scorer:
    """The PPO policy that ships with PruneNet (`--scorer policy`, the default).

    Trained with `prunenet train --model smollm2-135m --timesteps 1800 --seed 0` (selfgen
    features, function reward, ratios 0.1:0.5). It is size-agnostic, so it scores any supported
    model; its quality was measured on SmolLM2-135M (README). `seed` is unused: the policy's
    scores are deterministic and its self-generated text uses the seed it was trained with.
    """
    return PolicyScorer(str(BUNDLED_POLICY))


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
        self.metadata = read_metadata(checkpoint)
        if self.metadata["algo"] != "ppo":
            raise PruneNetError(
                f"{checkpoint} is a {self.metadata['algo']!r} checkpoint, not a PPO policy; "
                "load it with prunenet.rl.ppo.scorer.load_scorer_from_checkpoint."
            )
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
