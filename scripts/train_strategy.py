"""Train the strategy policy (`PruneNet/Strategy-v0`, PPO) on one model and compare it, request by
request, with the uniform cut and the random-search baseline on the same masked KL.

    python scripts/train_strategy.py --model smollm2-135m --timesteps 12000 \\
        --out prunenet/policies/smollm2-135m-strategy.zip

Everything is measured on the model's own text: the 64 x 128 tokens of prune's default analysis
text that strategies read (`strategy_tokens`; the text is written once per model and cached), the
last 4 sequences held out for the KL. Prints one table row per budget: KL of uniform, of the
best hand-made depth ramp (`--ramp-slopes`, tuned on the same tokens), of the policy (1
evaluation, plus the ramp's for a policy on the ramp base), of random search with
`--search-evaluations` evaluations around uniform, and of the same number of random corrections
of the best ramp (the fair search baseline for a ramp-based policy: same starting point).

`--base ramp` trains the policy to correct the request's best ramp (`PruneNet/Strategy-v0`
with `base="ramp"`: the reward is its gain over the ramp).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from prunenet.allocation.strategy import (
    BASES,
    RESIDUAL_SCALE,
    STRUCTURES,
    depth_ramp_actions,
    random_search,
    realise,
    strategy_context,
    uniform_actions,
)
from prunenet.allocation.structures import check_budget, parse_structures
from prunenet.analysis.sequential import analysis_text
from prunenet.errors import PruneNetError
from prunenet.io.models import load_model
from prunenet.rl.strategy import (
    EVAL_BUDGETS,
    StrategyTrainConfig,
    load_strategy_policy,
    propose,
    train_strategy,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--timesteps", type=int, default=12_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--structures", default=",".join(STRUCTURES))
    parser.add_argument("--out", required=True, help="checkpoint zip to write")
    parser.add_argument("--compare-only", action="store_true", help="skip training")
    parser.add_argument("--search-evaluations", type=int, default=32)
    parser.add_argument(
        "--budgets",
        default=",".join(str(b) for b in EVAL_BUDGETS),
        help="the requests compared at the end and measured at every training evaluation",
    )
    parser.add_argument(
        "--budget-range",
        default=",".join(str(b) for b in StrategyTrainConfig.budget_range),
        help="LOW,HIGH: the requests training episodes draw (at most what the FFN can give: "
        "23.8%% on Gemma-3-270M)",
    )
    parser.add_argument(
        "--base",
        choices=BASES,
        default="uniform",
        help="what the trained policy's actions are relative to: nothing (uniform) or the "
        "request's best depth ramp (ramp)",
    )
    parser.add_argument("--report", help="JSON file for the comparison")
    parser.add_argument(
        "--ramp-slopes",
        default="0.1,0.2,0.3,0.4,0.5",
        help="the hand-made depth-ramp rule at these slopes (the best is reported)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, _ = load_model(args.model)
    structures = parse_structures(args.structures, model.config)
    budgets = [float(b) for b in args.budgets.split(",")]
    for budget in budgets:  # uniform and the ramps cut FFN rows only: they must fit them
        check_budget(model, budget, ("ffn",))
    start = time.perf_counter()
    context = strategy_context(model, analysis_text(model))  # the text prune's default writes
    print(f"context (descriptors, scores) in {time.perf_counter() - start:.0f} s", flush=True)
    if not args.compare_only:
        low, high = (float(b) for b in args.budget_range.split(","))
        config = StrategyTrainConfig(timesteps=args.timesteps, seed=args.seed,
                                     structures=structures, budget_range=(low, high),
                                     eval_budgets=tuple(budgets), base=args.base)  # fmt: skip
        start = time.perf_counter()
        train_strategy(context, config, args.out, model_name=args.model)
        print(f"trained in {time.perf_counter() - start:.0f} s", flush=True)
    policy, metadata = load_strategy_policy(args.out)
    print(f"checkpoint step {metadata['best_step']}, mean log10 KL {metadata['mean_log10_kl']:.3f}"
          f", base {policy.base}")  # fmt: skip
    rows = []
    slopes = [float(s) for s in args.ramp_slopes.split(",")]
    print("budget | uniform KL | best depth ramp KL (slope) | policy KL | search KL (evals) | "
          "ramp + random corrections KL (evals) | policy layers dropped | heads")  # fmt: skip
    for budget in budgets:
        uniform = realise(uniform_actions(context.layer_count), budget, context.costs, structures)
        uniform_kl = context.kl(uniform)
        chosen = propose(policy, context, budget, structures)
        chosen.kl = context.kl(chosen)
        search = random_search(context, budget, args.search_evaluations, structures, args.seed)
        ramps = []
        for slope in slopes:
            ramp = realise(depth_ramp_actions(context.layer_count, slope), budget, context.costs,
                           structures, source=f"ramp {slope:g}")  # fmt: skip
            ramp.kl = context.kl(ramp)
            ramps.append(ramp)
        ramp = min(ramps, key=lambda r: r.kl)
        # Corrections as the ramp-based policy makes them: FFN exponents moved by up to
        # RESIDUAL_SCALE, so the search's spread is the policy's initial exploration there.
        center = depth_ramp_actions(context.layer_count, slopes[ramps.index(ramp)])
        around = random_search(context, budget, args.search_evaluations, structures, args.seed,
                               spread=0.5 * RESIDUAL_SCALE, center=center)  # fmt: skip
        rows.append({"budget": budget, "uniform": uniform.to_dict() | {"kl": uniform_kl},
                     "policy": chosen.to_dict(), "search": search.to_dict(),
                     "ramp_search": around.to_dict(),
                     "ramps": [r.to_dict() for r in ramps]})  # fmt: skip
        print(f"{budget:.2f} | {uniform_kl:.4f} | {ramp.kl:.4f} ({ramp.source}) | {chosen.kl:.4f} "
              f"| {search.kl:.4f} ({args.search_evaluations}) | {around.kl:.4f} "
              f"({args.search_evaluations} + {len(slopes)}) | {chosen.layers} | "
              f"{sum(chosen.query_heads)}", flush=True)  # fmt: skip
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps({"model": args.model, "rows": rows,
                                                 "policy": metadata}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except PruneNetError as error:
        print(f"train_strategy: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
