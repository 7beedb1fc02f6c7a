"""PPO training of the row-scoring policy on a model's own weights and self-generated text.

The loop is SB3's PPO, unchanged; this module builds the environment, evaluates the
deterministic policy every `eval_every` steps at fixed ratios, and keeps the best checkpoint.

Discount: the default `gamma` is 0. With a fixed ratio per layer, the rows kept in one layer do
not change the reward of another, so each step is its own contextual bandit and a discount over
layers (the paper uses 0.99) only adds the other layers' noise to every advantage. `--gamma
0.99` restores the paper's setting.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.monitor import Monitor
from tqdm.auto import tqdm

from prunenet import __version__
from prunenet.analysis.features import LayerData, model_layer_data
from prunenet.analysis.refit_statistics import refit_text
from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.core.ratios import validate_ratio, validate_ratio_range
from prunenet.errors import PruneNetError
from prunenet.io.models import load_model
from prunenet.io.saving import atomic_file
from prunenet.rl.checkpoint import (
    TrainingInterrupted,
    refuse_existing_checkpoint,
)
from prunenet.rl.observation import observation_for
from prunenet.rl.ppo.checkpoint import write_policy_members
from prunenet.rl.ppo.policy import RowScoringPolicy
from prunenet.rl.rewards import (
    NEEDS_ACTIVATIONS,
    NEEDS_REFIT_STATISTICS,
    mean_reward,
    reward_function,
)

# The environment is reached by its registered id, as for any Gymnasium environment: the "envs:"
# prefix makes gym.make import the top-level `envs` package, which imports `prunenet` (never the
# reverse, so the library has no import of the environments).
ROW_ENV_ID = "envs:PruneNet/FFNPrune-v0"


@dataclass
class TrainConfig:
    """Everything that defines a training run (recorded in the checkpoint).

    :param model: folder, hub id or alias of the model to learn on.
    :param out: path of the best checkpoint (.zip).
    :param ratios: range (low, high) of per-episode target ratios.
    :param timesteps: PPO environment steps (one step = one layer).
    :param reward: `function` (default), `refit` (output error after the prune-time ridge refit,
        on held-out self-generated text) or `ks` (the paper's 1/KS).
    :param feature_set: `selfgen` (default) or `weights` (streamable, weights-only features).
    :param gamma: discount over layers (0: layers are independent bandits; see module doc).
    :param learning_rate: Adam step size.
    :param hidden: width of the policy's row code.
    :param eval_every: steps between evaluations of the deterministic policy.
    :param eval_ratios: ratios the evaluations use (default: low, middle and high of `ratios`).
    :param seed: seeds PPO, the environment and the self-generated text.
    :param device: torch device for the policy (`cpu` or `cuda`).
    :param threads: torch CPU threads (1 by default: 2 threads were 10-130x slower here).
    :param overwrite: replace an existing checkpoint at `out`; without it, an existing file is
        refused before anything is loaded (a long run must not silently replace a policy).
    """

    model: str
    out: str
    ratios: tuple[float, float] = (0.1, 0.5)
    timesteps: int = 3000
    reward: str = "function"
    feature_set: str = "selfgen"
    gamma: float = 0.0
    learning_rate: float = 1e-3
    hidden: int = 32
    eval_every: int = 600
    eval_ratios: tuple[float, ...] | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    overwrite: bool = False


@dataclass
class TrainResult:
    """What a training run produced: best evaluation reward and when it was reached.

    Times are training seconds: wall time since training started minus the time spent in
    evaluations, so they measure learning and not the measuring of it.
    """

    checkpoint: str
    best_reward: float
    best_step: int
    seconds_to_best: float
    seconds: float
    feature_seconds: float
    eval_seconds: float
    history: list[tuple[int, float, float]] = field(default_factory=list)  # step, seconds, reward


def train_policy(config: TrainConfig, layer_data: list[LayerData] | None = None) -> TrainResult:
    """Train a policy with PPO and save the best checkpoint at `config.out`.

    :param config: the run's settings.
    :param layer_data: precomputed features (skips loading `config.model`), for benchmarks.
    :raises TrainingInterrupted: on Ctrl-C; the best checkpoint so far stays at `config.out`.
    """
    validate_train_config(config)
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    callback: BestCheckpointCallback | None = None
    try:
        if layer_data is None:
            model, _ = load_model(config.model)
            layer_data = model_layer_data(
                model,
                config.feature_set,
                SelfGenConfig(seed=config.seed),
                collect=config.reward in NEEDS_ACTIVATIONS,
                refit_text=(
                    refit_text(config.seed) if config.reward in NEEDS_REFIT_STATISTICS else None
                ),
            )
            del model
        feature_seconds = time.perf_counter() - start
        env = Monitor(
            gym.make(
                ROW_ENV_ID,
                disable_env_checker=True,  # the env's own tests run check_env
                layer_data=[layer_data],
                feature_set=config.feature_set,
                reward=config.reward,
                ratio_range=config.ratios,
            )
        )
        env.reset(seed=config.seed)
        layers = len(layer_data)
        agent = PPO(
            RowScoringPolicy,
            env,
            n_steps=4 * layers,
            batch_size=layers,
            n_epochs=5,
            learning_rate=config.learning_rate,
            gamma=config.gamma,
            seed=config.seed,
            device=config.device,
            policy_kwargs={"hidden": config.hidden},
            verbose=0,
        )
        callback = BestCheckpointCallback(config, layer_data, start_time=time.perf_counter())
        agent.learn(total_timesteps=config.timesteps, callback=callback)
        callback.evaluate_and_save()  # the final policy competes too
    except KeyboardInterrupt as interrupt:
        if callback is None:
            raise TrainingInterrupted(None) from interrupt
        callback.bar.close()  # SB3 skips _on_training_end when learn() is interrupted
        raise TrainingInterrupted(
            callback.checkpoint, callback.best_step, callback.best_reward
        ) from interrupt
    return TrainResult(
        checkpoint=config.out,
        best_reward=callback.best_reward,
        best_step=callback.best_step,
        seconds_to_best=callback.best_seconds,
        seconds=time.perf_counter() - callback.start_time - callback.eval_seconds,
        feature_seconds=feature_seconds,
        eval_seconds=callback.eval_seconds,
        history=callback.history,
    )


def evaluate_policy(
    policy: RowScoringPolicy, layer_data: list[LayerData], ratios: list[float], reward: str
) -> float:
    """Mean reward of the deterministic policy over all layers at each of `ratios`.

    :param policy: the policy being trained.
    :param layer_data: the layers it is evaluated on.
    :param ratios: evaluation ratios.
    :param reward: a name in `prunenet.rl.rewards.REWARDS`.
    """

    def scores(index: int, layer: LayerData, ratio: float) -> torch.Tensor:
        depth = index / max(len(layer_data) - 1, 1)
        return policy.row_scores(observation_for(layer.features, ratio, depth))

    return mean_reward(layer_data, ratios, reward, scores)


def evaluation_ratios(config: TrainConfig) -> list[float]:
    if config.eval_ratios:
        return list(config.eval_ratios)
    low, high = config.ratios
    return sorted({round(low, 4), round((low + high) / 2, 4), round(high, 4)})


class BestCheckpointCallback(BaseCallback):
    """Progress bar, periodic deterministic evaluation, and atomic best-checkpoint saving."""

    def __init__(self, config: TrainConfig, layer_data: list[LayerData], start_time: float):
        super().__init__()
        self.config = config
        self.layer_data = layer_data
        self.start_time = start_time
        self.best_reward = -np.inf
        self.best_step = 0
        self.best_seconds = 0.0
        self.eval_seconds = 0.0
        self.checkpoint: str | None = None  # set once a best policy is saved at config.out
        self.history: list[tuple[int, float, float]] = []
        self.bar = tqdm(total=config.timesteps, desc="PPO steps", unit="step", leave=False)

    def _on_step(self) -> bool:
        self.bar.update(1)
        # The last step is evaluated after PPO's final update (train_policy), not before it.
        last = self.num_timesteps >= self.config.timesteps
        if self.num_timesteps % self.config.eval_every == 0 and not last:
            self.evaluate_and_save()
        return True

    def _on_training_end(self) -> None:
        self.bar.close()

    def evaluate_and_save(self) -> None:
        tick = time.perf_counter()
        reward = evaluate_policy(
            self.model.policy, self.layer_data, evaluation_ratios(self.config), self.config.reward
        )
        seconds = tick - self.start_time - self.eval_seconds
        self.history.append((self.num_timesteps, seconds, reward))
        self.bar.set_postfix(
            eval_reward=f"{reward:.4f}", best=f"{max(reward, self.best_reward):.4f}"
        )
        if reward > self.best_reward:
            # Saved first, recorded second: an interrupted or failed save leaves the record
            # describing the checkpoint that is really at config.out.
            save_checkpoint(self.model, self.config, reward, self.num_timesteps)
            self.best_reward, self.best_step, self.best_seconds = (
                reward,
                self.num_timesteps,
                seconds,
            )
            self.checkpoint = self.config.out
        self.eval_seconds += time.perf_counter() - tick


def save_checkpoint(agent: PPO, config: TrainConfig, reward: float, step: int) -> None:
    """SB3 zip + PruneNet's weights and metadata, written beside the target and renamed.

    PruneNet loads only `policy.safetensors` and `prunenet.json` (nothing pickled); SB3's own
    members stay so that a user who trusts the file can still `PPO.load` it.

    :param agent: the PPO agent whose policy is saved.
    :param config: the run's settings (recorded; `config.out` is the target).
    :param reward: the policy's evaluation reward.
    :param step: the PPO step it was evaluated at.
    """
    with atomic_file(config.out) as path:
        agent.save(path)
        write_policy_members(
            path,
            {
                "algo": "ppo",
                "feature_set": config.feature_set,
                "reward": config.reward,
                "ratios": list(config.ratios),
                "source_model": config.model,
                "seed": config.seed,
                "timesteps": config.timesteps,
                "step": step,
                "eval_reward": reward,
                "train_config": asdict(config),
                "prunenet_version": __version__,
            },
            agent.policy,
        )


def validate_train_config(config: TrainConfig) -> None:
    """Refuse unusable settings before anything is loaded; normalises `config.ratios`.

    :param config: the run's settings.
    """
    config.ratios = validate_ratio_range(config.ratios)
    for ratio in config.eval_ratios or ():
        validate_ratio(ratio)
    reward_function(config.reward)
    if config.timesteps < 1:
        raise PruneNetError(f"--timesteps must be positive, got {config.timesteps}.")
    if not str(config.out).endswith(".zip"):
        raise PruneNetError(f"Checkpoint path {config.out} must end in .zip (an SB3 archive).")
    refuse_existing_checkpoint(config.out, config.overwrite)
