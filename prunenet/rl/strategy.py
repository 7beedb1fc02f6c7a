"""The strategy policy: PPO over `PruneNet/Strategy-v0`, its checkpoint, and using it.

One policy answers any parameter budget on the model it was trained for (the budget is part of
every observation, the descriptors are size-agnostic). Training keeps the checkpoint whose
deterministic strategies have the least mean log10 KL over `EVAL_BUDGETS`. A policy trained on
the ramp base (`StrategyTrainConfig.base`) proposes corrections to the request's best depth
ramp; its checkpoint says so, and `propose` measures that ramp first (6 KL passes).

Checkpoint: a zip with `prunenet.json` (what the network looks like and how it was trained,
plain JSON) and `policy.safetensors` (the SB3 actor-critic's state dict). Nothing is pickled;
loading rebuilds the network from the JSON and reads the tensors.
"""

from __future__ import annotations

import json
import math
import time
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import safetensors.torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.policies import ActorCriticPolicy
from tqdm.auto import tqdm

from prunenet.allocation.strategy import (
    BASES,
    DESCRIPTORS,
    STRUCTURES,
    Strategy,
    StrategyContext,
    check_base,
    observation_size,
    observe,
    on_base,
    random_search,
    realise,
)
from prunenet.errors import PruneNetError
from prunenet.io.saving import atomic_file
from prunenet.rl.checkpoint import ZIP_ERRORS, read_checked
from prunenet.rl.checks import MAX_HIDDEN, count_problem, tensor_problem

# The per-layer strategies `prunenet prune --strategy` and `prunenet pareto` know (`make_strategy`).
STRATEGIES = ("uniform", "ramp", "policy", "search")
BUNDLED_STRATEGY = Path(__file__).resolve().parents[1] / "policies" / "smollm2-135m-strategy.zip"
STRATEGY_ENV_ID = "envs:PruneNet/Strategy-v0"
EVAL_BUDGETS = (0.1, 0.2, 0.3)
METADATA = "prunenet.json"
WEIGHTS = "policy.safetensors"
KIND = "strategy-policy"
FORMAT = 1
ACTIONS = 3  # per layer: FFN weight exponent, head level, drop level (`allocation.strategy`)
RETRAIN = "Re-train it with scripts/train_strategy.py or restore the file."


@dataclass
class StrategyTrainConfig:
    """One training run.

    :param timesteps: PPO steps (one per layer; an episode is one request).
    :param seed: seeds PPO and the budgets sampled.
    :param budget_range: requests sampled per episode (fraction of parameters removed).
    :param structures: what the policy may cut (ffn required).
    :param hidden: width of the two hidden layers of actor and critic.
    :param log_std_init: initial log standard deviation of the actions (exploration).
    :param eval_every: episodes between evaluations of the deterministic policy.
    :param learning_rate: Adam step size.
    :param eval_budgets: the requests each evaluation measures (within `budget_range`'s reach).
    :param base: `uniform` (actions are the strategy) or `ramp` (they correct the best ramp).
    """

    timesteps: int = 12_000
    seed: int = 0
    budget_range: tuple[float, float] = (0.05, 0.35)
    structures: tuple[str, ...] = STRUCTURES
    hidden: int = 64
    log_std_init: float = -1.0
    eval_every: int = 16
    learning_rate: float = 3e-4
    eval_budgets: tuple[float, ...] = EVAL_BUDGETS
    base: str = "uniform"


@dataclass
class StrategyPolicy:
    """A strategy policy's network and what its actions are relative to.

    :param network: the SB3 actor-critic.
    :param base: `uniform` or `ramp` (`allocation.strategy.BASES`).
    """

    network: ActorCriticPolicy
    base: str = "uniform"


def _network_kwargs(hidden: int, log_std_init: float) -> dict:
    return {"net_arch": {"pi": [hidden, hidden], "vf": [hidden, hidden]},
            "log_std_init": log_std_init}  # fmt: skip


def propose(
    policy: StrategyPolicy,
    context: StrategyContext,
    target: float,
    structures: Sequence[str] = STRUCTURES,
) -> Strategy:
    """The policy's deterministic strategy for one request.

    :param policy: a trained strategy policy (`load_strategy_policy`).
    :param context: the model's `StrategyContext` (with descriptors).
    :param target: fraction of all parameters to remove.
    :param structures: what may be cut; the policy's proposals for other structures are ignored.
    """
    base = context.best_ramp(target) if policy.base == "ramp" else None
    slope = None if base is None else base.extra["slope"]
    actions = np.zeros((context.layer_count, 3))
    for step in range(context.layer_count):
        observation = observe(context, target, actions, step, slope)
        action, _ = policy.network.predict(observation, deterministic=True)
        actions[step] = np.clip(action, -1.0, 1.0)
    strategy = realise(on_base(actions, base), target, context.costs, structures, source="policy")
    if base is not None:
        strategy.extra = {"base": "ramp", "slope": slope, "base_kl": base.kl}
    return strategy


def mean_log_kl(policy, context: StrategyContext, structures, budgets=EVAL_BUDGETS) -> float:
    """Mean log10 KL of the policy's strategies at `budgets` (lower is better).

    :param policy: the policy.
    :param context: the model's `StrategyContext`.
    :param structures: what may be cut.
    :param budgets: the requests evaluated.
    """
    values = [
        math.log10(max(context.kl(propose(policy, context, b, structures)), 1e-8)) for b in budgets
    ]
    return float(np.mean(values))


class _BestPolicy(BaseCallback):
    """Evaluates the deterministic policy every `eval_every` episodes, saves the best."""

    def __init__(self, context, config, out, timesteps, model_name) -> None:
        super().__init__()
        self.context, self.config, self.out = context, config, out
        self.model_name = model_name
        self.best = math.inf
        self.best_step = 0
        self.episodes = 0
        self.history: list[dict] = []
        self.start = time.perf_counter()
        self.bar = tqdm(total=timesteps, desc="training the strategy policy", unit="step")

    def _on_step(self) -> bool:
        self.bar.update(1)
        for done in self.locals.get("dones", []):
            if done:
                self.episodes += 1
                if self.episodes % self.config.eval_every == 0:
                    self.evaluate()
        return True

    def evaluate(self) -> None:
        policy = StrategyPolicy(self.model.policy, self.config.base)
        score = mean_log_kl(policy, self.context, self.config.structures, self.config.eval_budgets)
        self.history.append({"step": self.num_timesteps, "episodes": self.episodes,
                             "seconds": time.perf_counter() - self.start,
                             "mean_log10_kl": score})  # fmt: skip
        self.bar.set_postfix(log10_kl=f"{score:.3f}", best=f"{min(score, self.best):.3f}")
        if score < self.best:
            self.best, self.best_step = score, self.num_timesteps
            save_strategy_policy(self.model.policy, self.out, self._metadata())  # base in config

    def _metadata(self) -> dict:
        return {"model": self.model_name, "config": asdict(self.config),
                "best_step": self.best_step, "mean_log10_kl": self.best,
                "eval_budgets": list(self.config.eval_budgets),
                "history": self.history}  # fmt: skip


def train_strategy(
    context: StrategyContext, config: StrategyTrainConfig, out: str | Path, model_name: str = ""
) -> dict:
    """Train the strategy policy with PPO on one model; the best checkpoint is written to `out`.

    :param context: the model's `StrategyContext` (descriptors computed).
    :param config: the run.
    :param out: checkpoint path (a zip, written atomically at every improvement).
    :param model_name: recorded in the checkpoint.
    :return: the checkpoint's metadata.
    """
    if "ffn" not in config.structures:
        raise PruneNetError("The strategy policy needs ffn among its structures.")
    env = Monitor(gym.make(STRATEGY_ENV_ID, context=context, budget_range=config.budget_range,
                           structures=config.structures, base=check_base(config.base),
                           disable_env_checker=True))  # fmt: skip
    env.reset(seed=config.seed)
    layers = context.layer_count
    agent = PPO(
        "MlpPolicy",
        env,
        n_steps=8 * layers,  # 8 requests per update
        batch_size=2 * layers,
        n_epochs=10,
        gamma=1.0,  # only the whole cut is paid, at the end
        gae_lambda=1.0,
        learning_rate=config.learning_rate,
        seed=config.seed,
        policy_kwargs=_network_kwargs(config.hidden, config.log_std_init),
        device="cpu",
        verbose=0,
    )
    callback = _BestPolicy(context, config, out, config.timesteps, model_name)
    callback.init_callback(agent)
    callback.evaluate()  # the untrained policy proposes (nearly) its base (uniform, ramp): the bar
    agent.learn(total_timesteps=config.timesteps, callback=callback)
    callback.evaluate()
    callback.bar.close()
    return callback._metadata()


def save_strategy_policy(policy: ActorCriticPolicy, path: str | Path, metadata: dict) -> None:
    """Write the policy as JSON + safetensors in a zip, atomically.

    :param policy: the SB3 actor-critic.
    :param path: the zip to write.
    :param metadata: facts about the run (JSON-serialisable); the network's shape is added.
    """
    config = metadata.get("config", {})
    base = config.get("base", "uniform")
    header = {"kind": KIND, "format": FORMAT, "descriptors": list(DESCRIPTORS), "base": base,
              "observation_size": observation_size(base), "hidden": config.get("hidden", 64),
              "log_std_init": config.get("log_std_init", -1.0), **metadata}  # fmt: skip
    state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    with atomic_file(path) as staging, zipfile.ZipFile(staging, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(METADATA, json.dumps(header, indent=1, default=list))
        zf.writestr(WEIGHTS, safetensors.torch.save(state))


def load_strategy_policy(path: str | Path) -> tuple[StrategyPolicy, dict]:
    """Read a strategy policy written by `save_strategy_policy` (no pickle anywhere). The
    network's description and the tensors' names, shapes and values are checked before the
    network is built, so a damaged or hostile file is refused without allocating anything.

    :param path: the checkpoint zip.
    :return: the policy (network in eval mode, and its base) and its metadata.
    """
    path = Path(path).expanduser()
    metadata, weights = _read_strategy_zip(path)
    if not isinstance(metadata, dict) or metadata.get("kind") != KIND:
        raise PruneNetError(f"{path} is not a PruneNet strategy policy (no kind {KIND!r}).")
    if metadata.get("descriptors") != list(DESCRIPTORS):
        raise PruneNetError(
            f"Strategy policy {path} was trained on other layer descriptors "
            f"({str(metadata.get('descriptors'))[:200]}); re-train it with this version."
        )
    hidden, log_std = metadata.get("hidden"), metadata.get("log_std_init")
    base = metadata.get("base", "uniform")  # checkpoints from before the ramp base: uniform
    problem = count_problem("hidden", hidden, MAX_HIDDEN)
    if problem is None and (isinstance(log_std, bool) or not isinstance(log_std, (int, float))
                            or not math.isfinite(log_std)):  # fmt: skip
        problem = f"log_std_init={str(log_std)[:40]}, which is not a finite number"
    if problem is None and base not in BASES:
        problem = f"base={str(base)[:40]}, which is not one of {', '.join(BASES)}"
    if problem:
        raise PruneNetError(
            f"Strategy policy {path} has a malformed network description: {problem}. {RETRAIN}"
        )
    network = f"a strategy network with hidden={hidden} on the {base} base"
    if problem := tensor_problem(weights, _state_shapes(observation_size(base), hidden), network):
        raise PruneNetError(f"Strategy policy {path} cannot be used: {problem}. {RETRAIN}")
    policy = ActorCriticPolicy(
        gym.spaces.Box(-np.inf, np.inf, (observation_size(base),), np.float32),
        gym.spaces.Box(-1.0, 1.0, (ACTIONS,), np.float32),
        lambda _: 0.0,
        **_network_kwargs(hidden, float(log_std)),
    )
    policy.load_state_dict(weights, strict=True)  # names and shapes checked above
    policy.set_training_mode(False)
    return StrategyPolicy(policy, base), metadata


def _read_strategy_zip(path: Path) -> tuple[object, dict]:
    """The checkpoint's JSON metadata (any JSON value) and its tensors, or a PruneNetError."""
    try:
        with zipfile.ZipFile(path) as archive:  # read_checked: no member beyond its size bound
            metadata = json.loads(read_checked(archive, METADATA))
            data = read_checked(archive, WEIGHTS)
    except ZIP_ERRORS as error:
        raise PruneNetError(
            f"Strategy policy {path} could not be read ({type(error).__name__}: "
            f"{str(error)[:200]}). {RETRAIN}"
        ) from None
    try:
        weights = safetensors.torch.load(data)
    except Exception as error:  # safetensors raises its own SafetensorError and others
        raise PruneNetError(
            f"Strategy policy {path} could not be read: {WEIGHTS} is not a valid safetensors "
            f"file ({type(error).__name__}: {str(error)[:200]}). {RETRAIN}"
        ) from None
    return metadata, weights


def _state_shapes(observation: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor of the strategy network (`_network_kwargs`), unbuilt.

    :param observation: length of one observation (`observation_size`).
    :param hidden: width of the actor's and the critic's two hidden layers.
    """
    shapes: dict[str, tuple[int, ...]] = {"log_std": (ACTIONS,)}
    for net in ("policy_net", "value_net"):
        shapes[f"mlp_extractor.{net}.0.weight"] = (hidden, observation)
        shapes[f"mlp_extractor.{net}.2.weight"] = (hidden, hidden)
        shapes[f"mlp_extractor.{net}.0.bias"] = shapes[f"mlp_extractor.{net}.2.bias"] = (hidden,)
    shapes.update({"action_net.weight": (ACTIONS, hidden), "action_net.bias": (ACTIONS,),
                   "value_net.weight": (1, hidden), "value_net.bias": (1,)})  # fmt: skip
    return shapes


def make_strategy(
    kind: str,
    context: StrategyContext,
    target: float,
    structures: Sequence[str] = ("ffn",),
    policy: StrategyPolicy | None = None,
    evaluations: int = 32,
    seed: int = 0,
) -> Strategy:
    """One request's strategy by `kind` (`ramp`, `policy` or `search`), its masked KL measured;
    `prunenet prune --strategy` and the benchmark's `+ramp` / `+strategy` / `+search` share it.

    :param kind: `ramp` (the depth ramp, slope by KL), `policy` (needs `policy`) or `search`.
    :param context: the model's `StrategyContext`.
    :param target: fraction of all parameters to remove.
    :param structures: what may be cut (ramp cuts FFN rows only).
    :param policy: a loaded strategy policy, for `policy`.
    :param evaluations: random strategies tried, for `search`.
    :param seed: the search's seed.
    """
    if kind == "ramp":  # measured once per budget: a ramp-based policy may need it as well
        return replace(context.best_ramp(target))
    if kind == "search":
        return random_search(context, target, evaluations, structures, seed=seed)
    if kind != "policy" or policy is None:
        raise PruneNetError(f"Unknown strategy {kind!r} (or no policy given for 'policy').")
    strategy = propose(policy, context, target, structures)
    strategy.kl = context.kl(strategy)
    return strategy
