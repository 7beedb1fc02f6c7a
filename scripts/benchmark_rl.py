"""RL speed benchmark: our PPO trainer vs the paper's REINFORCE baseline, and a new ratio.

One run on one model (SmolLM2-135M by default) prints, side by side:

1. training wall time per episode (one episode = every layer once) and time to the best
   evaluation reward, for PPO (`prunenet.rl.ppo.train`) and the REINFORCE baseline
   (`prunenet.rl.reinforce.train`), both on the SAME reward, the paper's 1/KS of singular values,
   and both evaluated the same way: mean reward over layers of the deterministic top-k at --ratio;
2. PPO's time to reach the baseline's best reward (its first evaluation >= that reward) and
   its ratio to the baseline's time to best (the target is <= 1/5);
3. the time to prune the model at a NEW ratio from the saved PPO checkpoint (load model, score
   with `PolicyScorer`, `prune_model`, `save_pruned` to a temporary folder): the first call
   computes the self-generated activations, the second reads them from the disk cache
   (`prunenet.io.cache`); the target is <= 10 s.

Features and activations are computed once (`model_layer_data(..., collect=True)`) and shared by
both trainers. Training seconds exclude evaluation (for both trainers; PPO's evaluations are
excluded by `prunenet.rl.ppo.train` itself, and `TrainConfig.eval_ratios` pins them to exactly
--ratio when PPO trains over a range of ratios), so they measure learning, not measuring it.
Both trainers' first evaluation follows one episode and comes before any learning (PPO updates
every 4 episodes; REINFORCE's first episode only sets its baseline), so "first eval reward"
shows what each policy's inputs give before training: PPO's row features vs the paper's raw
weight rows.

    python scripts/benchmark_rl.py                      # ~10 min on a loaded 2-core CPU
    python scripts/benchmark_rl.py --ppo-ratios 0.3:0.3 # PPO trained at the baseline's ratio only
    python scripts/benchmark_rl.py --quick --model DIR  # smoke run on a small model
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
import transformers

from prunenet.analysis.features import FEATURE_SETS, model_layer_data
from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.core.ratios import validate_ratio
from prunenet.errors import PruneNetError
from prunenet.io.models import load_model, resolve_model_path
from prunenet.pipeline import prune_and_save, scorer_planner
from prunenet.rl.ppo.train import TrainConfig, train_policy
from prunenet.rl.reinforce.train import train_reinforce
from prunenet.scoring.registry import load_scorer_from_checkpoint
from prunenet.tables import format_table

REWARD = "ks"  # the paper's 1/KS: the one reward both trainers are compared on
# 20 REINFORCE episodes: the paper code's default budget.
DEFAULTS = {"ppo_timesteps": 360, "ppo_eval_every": 30, "reinforce_episodes": 20}
QUICK = {"ppo_timesteps": 16, "ppo_eval_every": 4, "reinforce_episodes": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="folder, hub id or alias")
    parser.add_argument("--ratio", type=float, default=0.3, help="baseline's ratio; eval ratio")
    parser.add_argument(
        "--ppo-ratios",
        default="0.1:0.5",
        help="PPO's training ratio range LOW:HIGH (default 0.1:0.5, one checkpoint for every "
        "ratio; it is still evaluated at exactly --ratio). 0.3:0.3 trains at --ratio only",
    )
    parser.add_argument("--ppo-timesteps", type=int, help="PPO steps (1 step = 1 layer)")
    parser.add_argument("--ppo-eval-every", type=int, help="PPO steps between evaluations")
    parser.add_argument("--reinforce-episodes", type=int, help="REINFORCE episodes")
    parser.add_argument("--reinforce-eval-every", type=int, default=1, help="episodes per eval")
    parser.add_argument(
        "--features",
        default="selfgen",
        choices=sorted(FEATURE_SETS),
        help="PPO's features (the baseline always reads raw weight rows)",
    )
    parser.add_argument("--new-ratio", type=float, default=0.25, help="ratio pruned from ckpt")
    parser.add_argument("--seed", type=int, default=0, help="first seed (repeat i: seed + i)")
    parser.add_argument("--repeats", type=int, default=1, help="runs; medians are printed too")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="tiny budgets (smoke test)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.ratio = validate_ratio(args.ratio)
        args.new_ratio = validate_ratio(args.new_ratio)
        low, _, high = args.ppo_ratios.partition(":")
        args.ppo_ratios = (validate_ratio(low), validate_ratio(high or low))
    except (PruneNetError, ValueError) as error:
        parser.error(str(error))
    for key in ("ppo_timesteps", "ppo_eval_every", "reinforce_episodes", "repeats", "threads"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be positive")
    return args


@dataclass
class Run:
    """One repeat's measurements (seconds are training seconds unless named otherwise)."""

    seed: int
    ppo_per_episode: float = 0.0
    ppo_best: float = 0.0
    ppo_to_best: float = 0.0
    ppo_wall: float = 0.0
    reinforce_per_episode: float = 0.0
    reinforce_best: float = 0.0
    reinforce_to_best: float = 0.0
    reinforce_wall: float = 0.0
    ppo_to_reinforce_best: float | None = None
    prune_seconds: list[float] = field(default_factory=list)  # first call, second call
    ppo_history: list[tuple[int, float, float]] = field(default_factory=list)
    reinforce_history: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def time_ratio(self) -> float | None:
        if self.ppo_to_reinforce_best is None or self.reinforce_to_best <= 0:
            return None
        return self.ppo_to_reinforce_best / self.reinforce_to_best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    print(f"command: python scripts/benchmark_rl.py {shlex.join(argv or sys.argv[1:])}")
    start = time.perf_counter()
    model, _ = load_model(args.model)
    folder = resolve_model_path(args.model)
    # Computed once and shared by both trainers and every repeat (repeats vary the training
    # seed only); the reward needs no activations, but collecting them here is what `prunenet
    # train` does for the default feature set.
    tick = time.perf_counter()
    layer_data = model_layer_data(model, args.features, SelfGenConfig(seed=args.seed), True)
    layers = len(layer_data)
    print(f"features of {layers} layers in {time.perf_counter() - tick:.1f} s ({args.features}, "
          f"self-generated activations with seed {args.seed})", flush=True)  # fmt: skip
    runs = []
    with tempfile.TemporaryDirectory(prefix="prunenet-bench-rl-") as workdir:
        for repeat in range(args.repeats):
            seed = args.seed + repeat
            run = Run(seed)
            run_reinforce(args, layer_data, seed, Path(workdir), run)
            ppo_checkpoint = run_ppo(args, layer_data, seed, Path(workdir), run)
            run.prune_seconds = time_new_ratio(args, folder, ppo_checkpoint, Path(workdir))
            runs.append(run)
            print_histories(args, run)
    print()
    print(format_table(*results_table(args, runs, layers)))
    print(f"\nwhole benchmark: {time.perf_counter() - start:.0f} s wall")
    return 0


def run_reinforce(args, layer_data, seed: int, workdir: Path, run: Run) -> None:
    result = train_reinforce(
        layer_data,
        args.ratio,
        args.reinforce_episodes,
        seed=seed,
        out=workdir / f"reinforce-{seed}.zip",
        reward=REWARD,
        eval_every=args.reinforce_eval_every,
        source_model=args.model,
    )
    run.reinforce_per_episode = result.seconds_per_episode
    run.reinforce_best, run.reinforce_to_best = result.best_reward, result.seconds_to_best
    run.reinforce_wall, run.reinforce_history = result.seconds, result.history


def run_ppo(args, layer_data, seed: int, workdir: Path, run: Run) -> Path:
    out = workdir / f"ppo-{seed}.zip"
    config = TrainConfig(
        model=args.model,
        out=str(out),
        ratios=args.ppo_ratios,
        timesteps=args.ppo_timesteps,
        reward=REWARD,
        feature_set=args.features,
        eval_every=args.ppo_eval_every,
        eval_ratios=(args.ratio,),
        seed=seed,
        threads=args.threads,
    )
    result = train_policy(config, layer_data=layer_data)
    history = result.history  # (step, training seconds excluding evaluations, reward)
    best = max(history, key=lambda point: point[2])
    run.ppo_per_episode = result.seconds / (args.ppo_timesteps / len(layer_data))
    run.ppo_best, run.ppo_to_best = best[2], best[1]
    run.ppo_wall, run.ppo_history = result.seconds + result.eval_seconds, history
    reached = [seconds for _, seconds, reward in history if reward >= run.reinforce_best]
    run.ppo_to_reinforce_best = reached[0] if reached else None
    return out


def time_new_ratio(args, folder: str, checkpoint: Path, workdir: Path) -> list[float]:
    """Seconds to prune at --new-ratio from the checkpoint: cold analysis cache, then warm."""
    seconds = []
    with (
        tempfile.TemporaryDirectory(dir=workdir, prefix="cache-") as cache,
        mock.patch.dict(os.environ, {"PRUNENET_CACHE": cache}),
    ):
        for call in ("first", "second"):
            tick = time.perf_counter()
            model, tokenizer = load_model(folder)
            planner = scorer_planner(load_scorer_from_checkpoint(str(checkpoint)))
            out = workdir / f"pruned-{call}"
            prune_and_save(model, tokenizer, planner, [args.new_ratio], [out], overwrite=True)
            seconds.append(time.perf_counter() - tick)
            del model
    return seconds


def print_histories(args, run: Run) -> None:
    label = f"{args.model}, seed {run.seed}, eval at ratio {args.ratio}, reward {REWARD}"
    for name, unit, history in (("REINFORCE", "episode", run.reinforce_history),
                                ("PPO", "step", run.ppo_history)):  # fmt: skip
        points = ", ".join(f"({n}, {s:.1f}, {r:.4f})" for n, s, r in history)
        print(f"{name} history ({label}; {unit}, training s, reward): {points}", flush=True)


def results_table(args, runs: list[Run], layers: int) -> tuple[list[str], list[list]]:
    """Long format: every number on its own row with everything needed to read it."""
    device = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    ppo_name = f"PPO (ours; trained {args.ppo_ratios[0]}:{args.ppo_ratios[1]})"
    baseline = "REINFORCE (paper baseline)"
    measures = [
        ("train s / episode (excl. eval)", ppo_name, lambda r: r.ppo_per_episode),
        ("train s / episode (excl. eval)", baseline, lambda r: r.reinforce_per_episode),
        ("first eval reward (1/KS; ~untrained)", ppo_name, lambda r: r.ppo_history[0][2]),
        ("first eval reward (1/KS; ~untrained)", baseline, lambda r: r.reinforce_history[0][2]),
        ("best eval reward (1/KS)", ppo_name, lambda r: r.ppo_best),
        ("best eval reward (1/KS)", baseline, lambda r: r.reinforce_best),
        ("train s to best reward", ppo_name, lambda r: r.ppo_to_best),
        ("train s to best reward", baseline, lambda r: r.reinforce_to_best),
        ("train s to reach baseline's best", ppo_name, lambda r: r.ppo_to_reinforce_best),
        ("that / baseline's s to best (target <= 0.2)", ppo_name, lambda r: r.time_ratio),
        ("wall s incl. evaluation", ppo_name, lambda r: r.ppo_wall),
        ("wall s incl. evaluation", baseline, lambda r: r.reinforce_wall),
        (f"prune at new ratio {args.new_ratio}: 1st call s (features computed)", ppo_name,
         lambda r: r.prune_seconds[0]),
        (f"prune at new ratio {args.new_ratio}: 2nd call s (activations cached; target <= 10)",
         ppo_name, lambda r: r.prune_seconds[1]),
    ]  # fmt: skip
    budget = {ppo_name: f"{args.ppo_timesteps} steps", baseline: f"{args.reinforce_episodes} ep"}
    headers = ["measurement", "trainer", "model", "layers", "ratio", "reward", "seed",
               "budget", "device", "threads", "value"]  # fmt: skip
    rows = []
    seeds = [[run] for run in runs] + ([runs] if len(runs) > 1 else [])
    for name, trainer, measure in measures:
        ratio = args.new_ratio if name.startswith("prune") else args.ratio
        for group in seeds:
            values = [measure(run) for run in group]
            known = [v for v in values if v is not None]
            value = statistics.median(known) if len(known) == len(values) else "not reached"
            seed = (str(group[0].seed) if len(group) == 1
                    else f"median of {','.join(str(r.seed) for r in group)}")  # fmt: skip
            rows.append([name, trainer, args.model, layers, ratio, REWARD, seed,
                         budget[trainer], device, args.threads, value])  # fmt: skip
    return headers, rows


if __name__ == "__main__":
    sys.exit(main())
