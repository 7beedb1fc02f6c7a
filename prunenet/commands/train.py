"""`prunenet train`: learn a row-scoring policy on a model with PPO, save the best checkpoint.

`--algo reinforce` trains the paper-faithful REINFORCE baseline instead
(`prunenet.rl.reinforce.train`): one ratio, the paper's 1/KS reward and discount 0.99 by
default, a width-bound policy.

An existing `--out` is refused unless `--overwrite` is given. Ctrl-C stops training with one line
saying where the best checkpoint so far is (exit code 130), since it is already saved there.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from prunenet.analysis.features import FEATURE_SETS
from prunenet.commands.options import positive_int
from prunenet.core.devices import resolve_device
from prunenet.errors import PruneNetError, Terminated
from prunenet.rl.checkpoint import TrainingInterrupted
from prunenet.rl.ppo.train import TrainConfig, train_policy
from prunenet.rl.rewards import REWARDS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a pruning policy (PPO) on a model's own weights and generated text",
        description=(
            "Train the size-agnostic row-scoring policy with PPO. No dataset is read: features "
            "and rewards come from the model's weights and text it generates itself. The "
            "checkpoint then prunes any model of a supported architecture at any ratio "
            "(`prunenet prune --scorer CKPT`)."
        ),
    )
    parser.add_argument("--model", required=True, help="local folder, hub id, or alias")
    parser.add_argument(
        "--algo",
        default="ppo",
        choices=["ppo", "reinforce"],
        help="ppo (default): our size-agnostic policy; reinforce: the paper's baseline, one "
        "policy per ratio (give one ratio: --ratios 0.3)",
    )
    parser.add_argument("--out", required=True, help="checkpoint path (.zip)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out checkpoint"
    )
    parser.add_argument(
        "--ratios",
        default="0.1:0.5",
        type=parse_ratio_range,
        help="range of target ratios sampled per episode, LOW:HIGH (default 0.1:0.5)",
    )
    parser.add_argument(
        "--timesteps", type=positive_int, default=3000, help="PPO steps (1 step = 1 layer)"
    )
    parser.add_argument(
        "--episodes", type=int, default=20, help="reinforce episodes (1 episode = every layer)"
    )
    parser.add_argument(
        "--reward",
        default=None,
        choices=sorted(REWARDS),
        help="function: FFN output error on self-generated text (default for ppo); "
        "refit: the same error after the ridge refit that --refit lsq applies at prune time, "
        "on held-out self-generated text (64 x 128 tokens, generated and cached the first "
        "time; ~1 GB of statistics for SmolLM2); "
        "ks: the paper's 1/KS of singular values (default for reinforce)",
    )
    parser.add_argument(
        "--features",
        default="selfgen",
        choices=sorted(FEATURE_SETS),
        help="selfgen (default) or weights (weights-only, streamable)",
    )
    parser.add_argument(
        "--gamma",
        type=float,
        default=None,
        help="discount over layers (ppo default 0; reinforce default 0.99, the paper's)",
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--eval-every", type=positive_int, default=600, help="steps between evaluations"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="policy device: cpu (default) or cuda")
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="torch CPU threads (default 1)"
    )
    parser.set_defaults(run=run)


def parse_ratio_range(text: str) -> tuple[float, float]:
    parts = text.split(":")
    try:
        if len(parts) > 2:  # "0.1:0.2:0.3" must not silently mean 0.1
            raise ValueError(text)
        low, high = (float(p) for p in (parts if len(parts) == 2 else [parts[0], parts[0]]))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"ratio range {text!r} is not LOW:HIGH with numbers, e.g. 0.1:0.5"
        ) from None
    return low, high


def run(args: argparse.Namespace) -> int:
    try:
        return run_reinforce(args) if args.algo == "reinforce" else run_ppo(args)
    except KeyboardInterrupt as interrupt:
        return report_interruption(args, interrupt)


def report_interruption(args: argparse.Namespace, interrupt: KeyboardInterrupt) -> int:
    """Say where the best checkpoint so far is (training saves it as it goes); 128 + signal."""
    if isinstance(interrupt, TrainingInterrupted):
        progress, cause = interrupt, interrupt.__cause__
    else:  # while loading the model, before training began
        progress, cause = TrainingInterrupted(None), interrupt
    where = progress.summary()
    if progress.checkpoint is None and Path(args.out).expanduser().exists():
        where += f"; {args.out} still holds the checkpoint that was there before"
    terminated = isinstance(cause, Terminated)
    name = "SIGTERM" if terminated else "Ctrl-C"
    print(f"prunenet train: interrupted by {name}; {where}.", file=sys.stderr)
    return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


def run_ppo(args: argparse.Namespace) -> int:
    """Our size-agnostic PPO policy over a ratio range (`prunenet.rl.ppo.train`)."""
    args.reward = args.reward or "function"
    args.gamma = 0.0 if args.gamma is None else args.gamma
    config = TrainConfig(
        model=args.model,
        out=args.out,
        ratios=args.ratios,
        timesteps=args.timesteps,
        reward=args.reward,
        feature_set=args.features,
        gamma=args.gamma,
        learning_rate=args.learning_rate,
        eval_every=args.eval_every,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        overwrite=args.overwrite,
    )
    resolve_device(args.device)  # a clear error for --device cuda without CUDA
    result = train_policy(config)
    print(
        f"trained on {args.model} ({args.features} features, {args.reward} reward, ratios "
        f"{config.ratios[0]}:{config.ratios[1]}, seed {args.seed}, {args.device}, "
        f"{args.threads} thread(s)): {args.timesteps} steps in {result.seconds:.1f} s "
        f"(+{result.feature_seconds:.1f} s features); best eval reward {result.best_reward:.4f} "
        f"at step {result.best_step} ({result.seconds_to_best:.1f} s); saved {result.checkpoint}"
    )
    return 0


def run_reinforce(args: argparse.Namespace) -> int:
    """The paper's REINFORCE baseline at one ratio (`prunenet.rl.reinforce.train`)."""
    from prunenet.rl.reinforce.train import train_reinforce_from_model

    low, high = args.ratios
    if low != high:
        raise PruneNetError(
            f"--algo reinforce trains one policy per ratio, as the paper does; got the range "
            f"{low}:{high}. Pass one ratio, e.g. --ratios 0.3 (or --ratios 0.3:0.3)."
        )
    if args.episodes < 1:
        raise PruneNetError(f"--episodes must be positive, got {args.episodes}.")
    resolve_device(args.device)  # a clear error for --device cuda without CUDA
    reward = args.reward or "ks"
    gamma = 0.99 if args.gamma is None else args.gamma
    result = train_reinforce_from_model(
        args.model, low, args.episodes, args.out, seed=args.seed, lr=args.learning_rate,
        gamma=gamma, reward=reward, device=args.device, threads=args.threads,
        overwrite=args.overwrite,
    )  # fmt: skip
    print(
        f"trained the REINFORCE baseline on {args.model} (raw weight rows, {reward} reward, "
        f"ratio {low}, gamma {gamma}, seed {args.seed}, {args.device}, {args.threads} "
        f"thread(s)): {args.episodes} episodes in {result.seconds:.1f} s "
        f"({result.seconds_per_episode:.1f} s/episode training); best eval reward "
        f"{result.best_reward:.4f} at episode {result.best_episode} "
        f"({result.seconds_to_best:.1f} s); saved {result.checkpoint}"
    )
    return 0
