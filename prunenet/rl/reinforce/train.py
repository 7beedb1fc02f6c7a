"""BASELINE: the PruneNet paper's REINFORCE trainer, kept only to compare our PPO trainer with.

This is not PruneNet's recommended trainer (that is `prunenet.rl.ppo.train`, PPO with a
size-agnostic policy). It re-implements, from the paper's description ("You Only Prune Once",
ICLR 2025), the policy learner the paper trains:

- **Policy.** A linear map from each row's weight vector (the row of the FFN's first input
  projection, `fc1` or `gate_proj`: d_model numbers) to one logit per row. The paper's code
  parameterises the same map as `Linear(d_model, d_ff)` followed by a `d_ff` vector, which
  collapses to one `d_model` weight vector plus a bias; we keep the collapsed form (same
  function class, far cheaper). Its parameters depend on d_model and it is trained for one model
  and one ratio, so it cannot transfer to another width: a checkpoint is refused on a model whose
  d_model or d_ff differs. Our PPO policy (`prunenet.rl.ppo.policy`) has no width-dependent
  parameter and one checkpoint serves every width and ratio; that is the difference this
  baseline shows.
- **Actions.** One policy per target ratio r: in every layer, k = round((1 - r) * d_ff) rows are
  sampled WITHOUT replacement from softmax(logits) (Gumbel-top-k, which is exactly sequential
  sampling without replacement).
- **Reward.** The paper's 1 / KS between the singular values of the FFN input projections before
  and after (`prunenet.rl.rewards.spectral_reward`, the same function PPO uses with `reward="ks"`).
- **Return.** Discounted with gamma = 0.99 over the layers of an episode (one episode = every
  layer of the model once). A baseline is subtracted: per layer position, a moving average of
  past returns (it starts at the first episode's returns, so the first episode only sets it).
- **Loss.** -(sum over chosen rows of log p_row) x (return - baseline), summed over layers, one
  Adam step per episode.

Deviations from the paper's reference code, all deliberate: rows are scored by a softmax (the
code feeds sigmoid scores to `torch.multinomial`), the final pruning is the deterministic top-k
of the logits (the code samples it again, so its result depends on the RNG), and the return is
the discounted reward-to-go (the code weights each layer's reward by gamma^layer).

Evaluation: the mean 1/KS reward over layers of the deterministic top-k at the trained ratio.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from prunenet.analysis.features import LayerData
from prunenet.analysis.refit_statistics import collect_refit_statistics, refit_text
from prunenet.analysis.selfgen import SelfGenConfig, collect_activations
from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.ratios import keep_count, validate_ratio
from prunenet.core.surgery import ffn_weights
from prunenet.errors import PruneNetError
from prunenet.rl.checkpoint import (
    TrainingInterrupted,
    refuse_existing_checkpoint,
)
from prunenet.rl.reinforce.checkpoint import save_reinforce
from prunenet.rl.reinforce.policy import RowLogitPolicy, policy_rows
from prunenet.rl.rewards import (
    NEEDS_ACTIVATIONS,
    NEEDS_REFIT_STATISTICS,
    mean_reward,
    reward_function,
)

BASELINE_DECAY = 0.9  # moving average of past returns per layer position


@dataclass
class ReinforceResult:
    """What a baseline training run produced.

    `history` holds (episode, training seconds, evaluation reward). Training seconds exclude
    evaluation and checkpoint writes, so they measure what learning costs, not what measuring it
    costs; `seconds` is the whole run's wall time.
    """

    checkpoint: str | None
    ratio: float
    best_reward: float
    best_episode: int
    seconds_to_best: float
    train_seconds: float
    seconds: float
    episodes: int
    history: list[tuple[int, float, float]] = field(default_factory=list)
    sampled_rewards: list[float] = field(default_factory=list)  # mean per-layer reward per episode

    @property
    def seconds_per_episode(self) -> float:
        return self.train_seconds / max(self.episodes, 1)


def train_reinforce(
    layer_data: list[LayerData],
    ratio: float,
    episodes: int,
    seed: int = 0,
    lr: float = 1e-3,
    out: str | Path | None = None,
    gamma: float = 0.99,
    reward: str = "ks",
    eval_every: int = 1,
    source_model: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> ReinforceResult:
    """Train the paper's baseline policy at one `ratio`; save the best one at `out` if given.

    :param layer_data: per-layer data of one model (only `.ffn` is read, plus activations for
        rewards that need them); see `weight_layer_data` and
        `prunenet.analysis.features.model_layer_data`.
    :param ratio: the one target ratio this policy is for (fraction of FFN rows removed).
    :param episodes: episodes; one episode prunes every layer once (one reward per layer).
    :param seed: seeds the policy's initialisation and the row sampling.
    :param lr: Adam step size (the paper's code uses 1e-3).
    :param out: checkpoint path (.zip); None keeps nothing on disk.
    :param gamma: discount over layers (the paper's 0.99).
    :param reward: `ks` (the paper's 1/KS, default) or another name in
        `prunenet.rl.rewards.REWARDS`.
    :param eval_every: episodes between evaluations of the deterministic top-k (the last episode
        is always evaluated).
    :param source_model: recorded in the checkpoint's metadata.
    :param device: where the policy runs; rewards are computed on the CPU.
    :param progress: show a progress bar.
    :raises TrainingInterrupted: on Ctrl-C; the best checkpoint so far stays at `out`.
    """
    ratio = validate_ratio(ratio)
    if episodes < 1:
        raise PruneNetError(f"episodes must be positive, got {episodes}.")
    if eval_every < 1:
        raise PruneNetError(f"eval_every must be positive, got {eval_every}.")
    if out is not None and not str(out).endswith(".zip"):
        raise PruneNetError(f"Checkpoint path {out} must end in .zip.")
    reward_of = reward_function(reward)
    rows = _layer_rows(layer_data, device)
    d_ff, d_model = rows[0].shape
    kept = keep_count(d_ff, ratio)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seed the initialisation, leave the caller's RNG
        torch.manual_seed(seed)
        policy = RowLogitPolicy(d_model, d_ff).to(device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    baseline: torch.Tensor | None = None
    result = ReinforceResult(
        checkpoint=None if out is None else str(out),
        ratio=ratio,
        best_reward=float("-inf"),
        best_episode=0,
        seconds_to_best=0.0,
        train_seconds=0.0,
        seconds=0.0,
        episodes=episodes,
    )
    metadata = {"ratio": ratio, "reward": reward, "gamma": gamma, "learning_rate": lr,
                "episodes": episodes, "seed": seed, "source_model": source_model}  # fmt: skip
    start = time.perf_counter()
    saved: str | None = None  # the checkpoint written so far, for an interruption's message
    bar = tqdm(range(1, episodes + 1), desc="REINFORCE episodes", leave=False, disable=not progress)
    try:
        for episode in bar:
            tick = time.perf_counter()
            log_probs, rewards = [], []
            for layer, layer_rows in zip(layer_data, rows, strict=True):
                logits = policy(layer_rows)
                chosen = sample_rows(logits.detach(), kept, generator)
                rewards.append(reward_of(layer, chosen.sort().values.cpu()))
                # The paper's loss: the sum of the chosen rows' log-probabilities under one softmax.
                # It is not the exact log-probability of a sample without replacement (that is the
                # Plackett-Luce product over the sampled order), only the paper's surrogate for it.
                log_probs.append(torch.log_softmax(logits, dim=0)[chosen].sum())
            returns = discounted_returns(rewards, gamma)
            baseline = returns.clone() if baseline is None else baseline
            loss = -(torch.stack(log_probs) * (returns - baseline).to(device)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            baseline = BASELINE_DECAY * baseline + (1 - BASELINE_DECAY) * returns
            result.train_seconds += time.perf_counter() - tick
            result.sampled_rewards.append(sum(rewards) / len(rewards))
            if episode % eval_every == 0 or episode == episodes:
                value = evaluate_reinforce(policy, layer_data, ratio, reward)
                result.history.append((episode, result.train_seconds, value))
                if value > result.best_reward:
                    # Saved first, recorded second, so an interrupted save is never reported.
                    if out is not None:
                        save_reinforce(policy, out, {**metadata, "episode": episode,
                                                     "eval_reward": value})  # fmt: skip
                        saved = str(out)
                    result.best_reward, result.best_episode = value, episode
                    result.seconds_to_best = result.train_seconds
                bar.set_postfix(eval_reward=f"{value:.4f}", best=f"{result.best_reward:.4f}")
    except KeyboardInterrupt as interrupt:
        bar.close()
        raise TrainingInterrupted(
            saved, result.best_episode, result.best_reward, unit="episode"
        ) from interrupt
    result.seconds = time.perf_counter() - start
    return result


def train_reinforce_from_model(
    model: str,
    ratio: float,
    episodes: int,
    out: str | Path,
    seed: int = 0,
    lr: float = 1e-3,
    gamma: float = 0.99,
    reward: str = "ks",
    device: str = "cpu",
    threads: int = 1,
    overwrite: bool = False,
) -> ReinforceResult:
    """`prunenet train --algo reinforce`: load `model`, train the baseline, save the best.

    Settings are `train_reinforce`'s; `overwrite` replaces an existing checkpoint at `out`,
    which is otherwise refused before the model is loaded.
    """
    from prunenet.io.models import load_model

    torch.set_num_threads(threads)
    validate_ratio(ratio)
    reward_function(reward)
    if not str(out).endswith(".zip"):
        raise PruneNetError(f"Checkpoint path {out} must end in .zip.")
    refuse_existing_checkpoint(out, overwrite)
    loaded, _ = load_model(model)
    selfgen = SelfGenConfig(seed=seed) if reward in NEEDS_ACTIVATIONS else None
    refit = refit_text(seed) if reward in NEEDS_REFIT_STATISTICS else None
    layer_data = weight_layer_data(loaded, selfgen, refit)
    del loaded
    return train_reinforce(layer_data, ratio, episodes, seed, lr, out, gamma, reward,
                           source_model=model, device=device)  # fmt: skip


def sample_rows(logits: torch.Tensor, kept: int, generator: torch.Generator) -> torch.Tensor:
    """`kept` distinct rows drawn without replacement from softmax(logits) (Gumbel-top-k)."""
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-12, 1.0 - 1e-12)))
    return torch.topk(logits.double().cpu() + gumbel, kept).indices.to(logits.device)


def discounted_returns(rewards: list[float], gamma: float) -> torch.Tensor:
    """G_t = sum_{j >= t} gamma^(j - t) r_j over the layers of one episode."""
    returns = torch.zeros(len(rewards), dtype=torch.float64)
    running = 0.0
    for index in reversed(range(len(rewards))):
        running = rewards[index] + gamma * running
        returns[index] = running
    return returns.float()


@torch.no_grad()
def evaluate_reinforce(
    policy: RowLogitPolicy, layer_data: list[LayerData], ratio: float, reward: str = "ks"
) -> float:
    """Mean reward over layers of the deterministic top-k of the logits at `ratio`.

    :param policy: the baseline policy.
    :param layer_data: the layers it is evaluated on.
    :param ratio: the one ratio it is trained for.
    :param reward: a name in `prunenet.rl.rewards.REWARDS`.
    """
    device = next(policy.parameters()).device
    return mean_reward(
        layer_data,
        [ratio],
        reward,
        lambda index, layer, _: policy(policy_rows(layer.ffn).to(device)),
    )


def weight_layer_data(
    model: nn.Module, selfgen: SelfGenConfig | None = None, refit: SelfGenConfig | None = None
) -> list[LayerData]:
    """Layer data without features (the baseline reads raw rows); activations if `selfgen`,
    refit statistics (`prunenet.analysis.refit_statistics`) on the text `refit` if given."""
    adapter = adapter_for(model.config)
    activations = collect_activations(model, selfgen) if selfgen is not None else None
    refits = collect_refit_statistics(model, refit) if refit is not None else None
    data = []
    for index, layer in enumerate(decoder_layers(model)):
        ffn = ffn_weights(layer, adapter)
        acts = activations[index] if activations else None
        statistics = refits[index] if refits else None
        data.append(LayerData(torch.empty(ffn.width, 0), ffn, acts, statistics))
    return data


def _layer_rows(layer_data: list[LayerData], device: str) -> list[torch.Tensor]:
    if not layer_data:
        raise PruneNetError("The model has no FFN layers to train on.")
    rows = [policy_rows(layer.ffn).to(device) for layer in layer_data]
    shapes = {tuple(r.shape) for r in rows}
    if len(shapes) != 1:
        raise PruneNetError(
            f"The REINFORCE baseline needs one FFN shape in every layer, got {sorted(shapes)}."
        )
    return rows
