"""A size-agnostic SB3 actor-critic policy for scoring FFN rows (its checkpoints: `checkpoint`).

DeepSets shape: one small network encodes every row (shared weights), a mean over rows gives
the layer's context, a per-row head turns (row code, context) into a score, and the critic reads
only the pooled context. No parameter depends on the row count, so a checkpoint trained on one
model scores FFNs of any width, and permuting the rows permutes the scores exactly.

Exploration noise is shared by all rows: a Gaussian over how the row features are weighted
(`FeatureSpaceGaussian`), never an independent draw per row index. Its log-probability has a
fixed dimension (the feature count), so the PPO ratio does not explode with the row count.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.distributions import DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from prunenet.analysis.features import CONTEXT_FEATURES

DEFAULT_HIDDEN = 32  # the row code's width when a (format-1) checkpoint does not say


class FeatureSpaceGaussian(DiagGaussianDistribution):
    """Row scores `mean + basis @ noise`, with `noise ~ N(0, std^2 I_k)` shared by all rows.

    `basis` is the layer's `rows x k` feature matrix, so exploration perturbs how features are
    weighted, not each row independently: k (about 10) random directions instead of thousands.
    Independent per-row noise made PPO's gradient signal vanish at 1.5k rows (no learning in
    3k steps on SmolLM2). The log-probability is that of the noise, recovered from an action by
    least squares on the basis (exact, because every action lies in `mean + span(basis)`).
    """

    def proba_distribution(
        self, mean_actions: torch.Tensor, log_std: torch.Tensor, basis: torch.Tensor
    ) -> FeatureSpaceGaussian:
        self.mean = mean_actions
        self.basis = basis
        noise_std = log_std.exp().expand(basis.shape[:-2] + basis.shape[-1:])
        self.distribution = torch.distributions.Normal(torch.zeros_like(noise_std), noise_std)
        return self

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the basis is observed data: no gradient flows through it
            projector = torch.linalg.pinv(self.basis)
        noise = (projector @ (actions - self.mean).unsqueeze(-1)).squeeze(-1)
        return self.distribution.log_prob(noise).sum(dim=-1)

    def entropy(self) -> torch.Tensor:
        return self.distribution.entropy().sum(dim=-1)

    def sample(self) -> torch.Tensor:
        noise = self.distribution.rsample()
        return self.mean + (self.basis @ noise.unsqueeze(-1)).squeeze(-1)

    def mode(self) -> torch.Tensor:
        return self.mean


class RowsExtractor(BaseFeaturesExtractor):
    """Keeps observations as (batch, rows, columns) instead of flattening them."""

    def __init__(self, observation_space: gym.spaces.Box) -> None:
        super().__init__(observation_space, features_dim=observation_space.shape[-1])

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return observations


class RowSetEncoder(nn.Module):
    """Shared per-row encoder with pooled context; SB3's `mlp_extractor` slot.

    :param columns: features per row (including the context columns).
    :param hidden: width of the row code.
    """

    def __init__(self, columns: int, hidden: int) -> None:
        super().__init__()
        self.noise_columns = columns - len(CONTEXT_FEATURES)
        self.latent_dim_pi = hidden
        self.latent_dim_vf = hidden
        self.row = nn.Sequential(
            nn.Linear(columns, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.mix = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh())
        self.critic = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_actor(rows), self.forward_critic(rows)

    def forward_actor(self, rows: torch.Tensor) -> torch.Tensor:
        """Row codes, with the raw row features appended as the exploration-noise basis."""
        codes = self.row(rows)
        context = codes.mean(dim=-2, keepdim=True).expand_as(codes)
        latent = self.mix(torch.cat([codes, context], dim=-1))
        return torch.cat([latent, rows[..., : self.noise_columns]], dim=-1)

    def forward_critic(self, rows: torch.Tensor) -> torch.Tensor:
        return self.critic(self.row(rows).mean(dim=-2))


def state_shapes(columns: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor of a `RowScoringPolicy`'s state dict, without building
    one: a checkpoint is checked against this before any network is allocated.

    :param columns: features per row (the observation's last dimension).
    :param hidden: width of the row code.
    """
    weights = {
        "mlp_extractor.row.0": (hidden, columns),
        "mlp_extractor.row.2": (hidden, hidden),
        "mlp_extractor.mix.0": (hidden, 2 * hidden),
        "mlp_extractor.critic.0": (hidden, hidden),
        "action_net": (1, hidden),
        "value_net": (1, hidden),
    }
    shapes: dict[str, tuple[int, ...]] = {"log_std": ()}
    for name, shape in weights.items():
        shapes[f"{name}.weight"] = shape
        shapes[f"{name}.bias"] = shape[:1]
    return shapes


class RowScoringPolicy(ActorCriticPolicy):
    """SB3 `ActorCriticPolicy` that scores a variable number of rows with shared weights.

    :param hidden: width of the per-row code (the only size parameter).
    Other parameters are `ActorCriticPolicy`'s; `net_arch` is ignored.
    """

    def __init__(self, *args, hidden: int = DEFAULT_HIDDEN, **kwargs) -> None:
        self.hidden = hidden
        kwargs.setdefault("features_extractor_class", RowsExtractor)
        super().__init__(*args, **kwargs)

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = RowSetEncoder(self.features_dim, self.hidden)

    def _build(self, lr_schedule) -> None:
        self.action_dist = FeatureSpaceGaussian(int(np.prod(self.action_space.shape)))
        self._build_mlp_extractor()
        self.action_net = nn.Linear(self.hidden, 1)
        self.log_std = nn.Parameter(torch.tensor(float(self.log_std_init)))
        self.value_net = nn.Linear(self.hidden, 1)
        if self.ortho_init:
            gains = {self.mlp_extractor: np.sqrt(2), self.action_net: 0.01, self.value_net: 1.0}
            for module, gain in gains.items():
                module.apply(lambda m, gain=gain: self.init_weights(m, gain=gain))
        self.optimizer = self.optimizer_class(
            self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs
        )

    def _get_action_dist_from_latent(self, latent_pi: torch.Tensor) -> FeatureSpaceGaussian:
        codes, basis = latent_pi[..., : self.hidden], latent_pi[..., self.hidden :]
        mean_scores = self.action_net(codes).squeeze(-1)
        return self.action_dist.proba_distribution(mean_scores, self.log_std, basis)

    def _get_constructor_parameters(self) -> dict:
        data = super()._get_constructor_parameters()
        data["hidden"] = self.hidden
        return data

    @torch.no_grad()
    def row_scores(self, observation: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Deterministic scores (the Gaussian means) for one layer's `rows x columns` matrix."""
        rows = torch.as_tensor(np.asarray(observation), dtype=torch.float32, device=self.device)
        return self.get_distribution(rows.unsqueeze(0)).mode().squeeze(0).cpu()
