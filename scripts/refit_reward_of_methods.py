"""The `refit` reward of each method's row selection: how well the prune-time refit repairs it.

For one model (SmolLM2-135M by default), each scorer and ratio, it selects the rows every layer
keeps, either one-shot (scores from the dense model's features: what PPO training sees) or
sequentially with the lsq refit (each layer scored on the already-cut and refitted model: the
rows `<scorer>+seq+lsq` in `scripts/benchmark_quality.py` keeps), and reports the mean over
layers of `prunenet.rl.rewards.refit_reward`: 1 - held-out squared error of the dense layer's
FFN output after a ridge refit (relative ridge 0.1) of the kept columns / held-out dense output
energy, on the dense model's 64 x 128 self-generated tokens (the last quarter held out). For a
sequential selection this judges the rows on the dense model's activations, not the cut
model's that chose them. It writes a Markdown table and JSON to --out-dir:

    python scripts/refit_reward_of_methods.py \\
        --named-policy ppo-refit=results/policies/smollm2-135m-ppo-refit.zip \\
        --methods ppo-refit,policy,selfgen --ratios 0.3,0.5 --out-dir results/policy-refit
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from prunenet.analysis.refit_statistics import collect_refit_statistics, refit_text
from prunenet.analysis.sequential import SequentialCut, analysis_text
from prunenet.core.compress import prune_model, select_keep_indices
from prunenet.core.ratios import validate_ratio
from prunenet.errors import PruneNetError
from prunenet.io.models import load_model
from prunenet.pipeline import ANALYSES, scorer_planner
from prunenet.scoring.ppo import PolicyScorer
from prunenet.scoring.registry import SCORERS, make_scorer
from prunenet.tables import format_table, markdown_table

HEADERS = ["method", "analysis", "ratio", "mean refit reward", "worst layer", "worst reward",
           "select s"]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias or folder")
    parser.add_argument("--methods", default="policy,selfgen", help="scorer names, comma list")
    parser.add_argument(
        "--named-policy", action="append", default=[], metavar="NAME=CHECKPOINT",
        help="a PPO checkpoint as the method NAME (repeatable)",
    )  # fmt: skip
    parser.add_argument("--ratios", default="0.3,0.5", help="comma list")
    parser.add_argument("--analysis", default="oneshot,sequential", help="comma list of both")
    parser.add_argument("--seed", type=int, default=0, help="self-generated text seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default="results/policy-refit")
    args = parser.parse_args(argv)
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    args.analysis = [name.strip() for name in args.analysis.split(",") if name.strip()]
    if any(name not in ANALYSES for name in args.analysis):
        parser.error(f"--analysis: choose among {', '.join(ANALYSES)}")
    try:
        args.ratios = [validate_ratio(float(part)) for part in args.ratios.split(",")]
        args.policies = dict(entry.split("=", 1) for entry in args.named_policy)
    except (ValueError, PruneNetError) as error:
        parser.error(str(error))
    unknown = [n for n in args.methods if n not in SCORERS and n not in args.policies]
    if unknown:
        parser.error(f"unknown method {', '.join(unknown)}; known: {', '.join(SCORERS)}")
    return args


def selections(model, scorer, ratio: float, analysis: str, tokens) -> list[torch.Tensor]:
    """The rows each layer keeps at `ratio`: the top scores on the dense model (oneshot), or what
    the layer-by-layer cut with the lsq refit keeps (sequential), as the benchmark cuts."""
    plan = scorer_planner(scorer, analysis=analysis)(model, ratio)
    if analysis == "oneshot":
        return [
            select_keep_indices(scores, kept)
            for scores, kept in zip(plan.scores, plan.layer_keep, strict=True)
        ]
    pruned = copy.deepcopy(model)
    cut = SequentialCut(pruned, "lsq", tokens, plan.layer_score)
    kept_rows: list[torch.Tensor] = []

    def recording_cut(index, layer, scores, kept):
        kept_rows.append(cut(index, layer, scores, kept))
        return kept_rows[-1]

    prune_model(pruned, plan.scores, plan.layer_keep, target_ratio=ratio, cut=recording_cut)
    return kept_rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        model, _ = load_model(args.model, device="cpu")
        statistics = collect_refit_statistics(model, refit_text(args.seed))
        tokens = analysis_text(model) if "sequential" in args.analysis else None
        rows = []
        for name in args.methods:
            scorer = (
                PolicyScorer(args.policies[name]) if name in args.policies else make_scorer(name)
            )
            for analysis in args.analysis:
                for ratio in args.ratios:
                    start = time.perf_counter()
                    keeps = selections(model, scorer, ratio, analysis, tokens)
                    seconds = time.perf_counter() - start
                    rewards = [1 - s.held_error(k) for s, k in zip(statistics, keeps, strict=True)]
                    worst = min(range(len(rewards)), key=rewards.__getitem__)
                    rows.append({"method": name, "analysis": analysis, "ratio": ratio,
                                 "mean_reward": sum(rewards) / len(rewards), "worst_layer": worst,
                                 "worst_reward": rewards[worst], "select_s": seconds,
                                 "layer_rewards": rewards})  # fmt: skip
                    print(format_table(HEADERS, [display(rows[-1])]), flush=True)
    except PruneNetError as error:
        print(f"refit_reward_of_methods: {error}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "scripts/refit_reward_of_methods.py", *sys.argv[1:]])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"refit_reward_{Path(args.model).name}"
    record = {"command": command, "model": args.model, "seed": args.seed, "rows": rows,
              "policies": args.policies}  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    stem.with_suffix(".md").write_text(
        markdown_table(HEADERS, [display(r) for r in rows])
        + f"\n\nMeasured with `{command}`: mean over layers of the `refit` reward (1 - held-out "
        "error after a ridge refit, relative ridge 0.1, of the kept columns with an intercept / "
        "held-out dense output energy; the dense model's activations on 64 x 128 "
        f"self-generated tokens, seed {args.seed}, the last 16 sequences held out) of the rows "
        "each method keeps: oneshot = top scores on the dense model; sequential = the rows "
        "the layer-by-layer cut with the lsq refit keeps (benchmark method +seq+lsq).\n"
    )
    print(format_table(HEADERS, [display(r) for r in rows]))
    print(f"wrote {stem}.md, {stem}.json")
    return 0


def display(row: dict) -> list:
    return [row["method"], row["analysis"], f"{row['ratio']:.2f}", f"{row['mean_reward']:.4f}",
            row["worst_layer"], f"{row['worst_reward']:.4f}", f"{row['select_s']:.0f}"]  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
