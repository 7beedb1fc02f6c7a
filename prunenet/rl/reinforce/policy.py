"""BASELINE: the PruneNet paper's REINFORCE policy, a linear map from a row's weights to a logit.

See `prunenet.rl.reinforce.train` for what the baseline is and why it is kept.
"""

from __future__ import annotations

import torch
from torch import nn

from prunenet.core.arch import FFNWeights

ALGO = "reinforce"
FEATURE_SET = "weights-raw"  # the raw rows of the first FFN input projection, no features
# The largest hidden size and FFN width a checkpoint may declare: today's largest models have
# 16k and 53k; a larger number is a damaged file, refused before anything is allocated.
MAX_WIDTH = 1 << 20


def state_shapes(d_model: int) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor of a `RowLogitPolicy`'s state dict, without building one.

    :param d_model: length of a row (the model's hidden size).
    """
    return {"linear.weight": (1, d_model), "linear.bias": (1,)}


class RowLogitPolicy(nn.Module):
    """logit_i = <w, row_i> + b: the paper's policy, one logit per FFN row from its weights.

    :param d_model: length of a row (the model's hidden size); the only parameter shape.
    :param d_ff: number of rows of the model it is trained for (recorded and checked, since the
        paper's policy is tied to one model).
    """

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_ff = d_ff
        self.linear = nn.Linear(d_model, 1)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.linear(rows).squeeze(-1)


def policy_rows(ffn: FFNWeights) -> torch.Tensor:
    """The policy's input: rows of the first FFN input projection (fc1 or gate_proj)."""
    return ffn.inputs[0].detach().float()
