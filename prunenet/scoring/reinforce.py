"""BASELINE: score rows with a REINFORCE checkpoint (the paper's policy), weights only."""

from __future__ import annotations

from pathlib import Path

import torch

from prunenet.core.arch import FFNWeights
from prunenet.errors import PruneNetError
from prunenet.rl.reinforce.checkpoint import load_reinforce
from prunenet.rl.reinforce.policy import policy_rows
from prunenet.scoring.base import Scorer


class ReinforceScorer(Scorer):
    """Scores from a baseline checkpoint: the policy's logits, deterministic, weights only.

    Any ratio can be asked for (the top-k of the logits), but the paper trains one policy per
    ratio, so `describe()` records the ratio it was trained for.

    :param checkpoint: path of a `prunenet train --algo reinforce` zip.
    :param device: where the policy runs.
    """

    name = "reinforce"
    weights_only = True

    def __init__(self, checkpoint: str | Path, device: str = "cpu") -> None:
        self.checkpoint = str(checkpoint)
        self.device = device
        self.policy, self.metadata = load_reinforce(checkpoint, device)

    @torch.no_grad()
    def score_layer(
        self, ffn: FFNWeights, layer_index: int, num_layers: int, ratio: float | None = None
    ) -> torch.Tensor:
        rows = policy_rows(ffn)
        if tuple(rows.shape) != (self.policy.d_ff, self.policy.d_model):
            raise PruneNetError(
                f"REINFORCE checkpoint {self.checkpoint} was trained on "
                f"{self.metadata.get('source_model')} (d_model {self.policy.d_model}, d_ff "
                f"{self.policy.d_ff}); layer {layer_index} of this model has d_model "
                f"{rows.shape[1]}, d_ff {rows.shape[0]}. The paper's policy is a linear map "
                "over one model's rows and cannot score another width: train one for this model "
                "with `prunenet train --algo reinforce`, or use the size-agnostic PPO policy "
                "(`prunenet train`), whose checkpoints score any width."
            )
        return self.policy(rows.to(self.device)).cpu()

    def describe(self) -> dict:
        keys = ("algo", "feature_set", "reward", "ratio", "source_model", "seed", "episode")
        return {"scorer": self.name, "checkpoint": self.checkpoint,
                **{k: self.metadata.get(k) for k in keys}}  # fmt: skip
