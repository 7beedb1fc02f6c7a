"""`prunenet train`: learn a row-scoring policy on a model with PPO, save the best checkpoint."""

from __future__ import annotations

import argparse

from prunenet.errors import PruneNetError
from prunenet.features import FEATURE_SETS
from prunenet.rewards import REWARDS
from prunenet.train import TrainConfig, train_policy


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a pruning policy (PPO) on a model's own weights and generated text",
        description=(
            "Train the size-agnostic row-scoring policy with PPO. No dataset is read: features "
            "and rewards come from the model's weights and text it generates itself. The "
            "checkpoint then prunes any model of a supported architecture at any ratio "
            "(`prunenet prune --policy CKPT`)."
        ),
    )
    parser.add_argument("--model", required=True, help="local folder, hub id, or alias")
    parser.add_argument("--out", required=True, help="checkpoint path (.zip)")
    parser.add_argument(
        "--ratios",
        default="0.1:0.5",
        type=parse_ratio_range,
        help="range of target ratios sampled per episode, LOW:HIGH (default 0.1:0.5)",
    )
    parser.add_argument("--timesteps", type=int, default=3000, help="PPO steps (1 step = 1 layer)")
    parser.add_argument(
        "--reward",
        default="function",
        choices=sorted(REWARDS),
        help="function: FFN output error on self-generated text (default); "
        "ks: the paper's 1/KS of singular values",
    )
    parser.add_argument(
        "--features",
        default="selfgen",
        choices=sorted(FEATURE_SETS),
        help="selfgen (default) or weights (weights-only, streamable)",
    )
    parser.add_argument(
        "--gamma", type=float, default=0.0, help="discount over layers (0 default; paper 0.99)"
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=600, help="steps between evaluations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="policy device: cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.set_defaults(run=run)


def parse_ratio_range(text: str) -> tuple[float, float]:
    parts = text.split(":")
    try:
        low, high = (float(p) for p in (parts if len(parts) == 2 else [parts[0], parts[0]]))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"ratio range {text!r} is not LOW:HIGH with numbers, e.g. 0.1:0.5"
        ) from None
    return low, high


def run(args: argparse.Namespace) -> int:
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
    )
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise PruneNetError("--device cuda was given but no CUDA device is available.")
    result = train_policy(config)
    print(
        f"trained on {args.model} ({args.features} features, {args.reward} reward, ratios "
        f"{config.ratios[0]}:{config.ratios[1]}, seed {args.seed}, {args.device}, "
        f"{args.threads} thread(s)): {args.timesteps} steps in {result.seconds:.1f} s "
        f"(+{result.feature_seconds:.1f} s features); best eval reward {result.best_reward:.4f} "
        f"at step {result.best_step} ({result.seconds_to_best:.1f} s); saved {result.checkpoint}"
    )
    return 0
