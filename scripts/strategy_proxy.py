"""Does the masked KL rank strategies as the real cut with the refit does?

Every strategy PruneNet chooses (`--strategy ramp|search|policy`, the structure split) is judged
by KL(dense || dense model with the strategy applied as masks) on held-out self-generated text:
one forward pass, no weight touched, no refit. The model a user gets is cut AND refitted
(sequential analysis, lsq refit). The refit repairs FFN-row damage, not a dropped layer's or a
removed head's, so the masked KL may rank strategies differently from the models they become.

This script measures that. On one model and one budget it builds strategies of every kind (the
uniform FFN cut, depth ramps, random per-layer strategies that may also take heads and drop
layers), scores each by the masked KL, cuts each with the prune pipeline
(`prunenet.pipeline.apply_strategy`, the default scorer, sequential analysis, the refit) and
measures the cut model's KL on the same held-out tokens with the same code. It prints a table,
Spearman and Kendall rank correlations, whether both pick the same best strategy, and the
regret of trusting the proxy (real KL of the proxy's pick over the real best):

    python scripts/strategy_proxy.py --model smollm2-135m --budget 0.2 --random 10 \\
        --out-dir results/strategy-proxy-smollm2

The text: the run's own text (`--text`, written once and cached), of which strategies read
their usual 64 x 128 part (`strategy_tokens`); its last sequences are held out by both the
strategies and the cut, so the real KL is measured on tokens the refit never fitted.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr

from prunenet.allocation.strategy import (
    depth_ramp_actions,
    realise,
    strategy_context,
    uniform_actions,
)
from prunenet.allocation.structures import check_budget, parse_structures
from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.analysis.sequential import analysis_text
from prunenet.commands.prune import parse_text
from prunenet.errors import PruneNetError
from prunenet.evaluation.divergence import kl_and_perplexity
from prunenet.io.models import load_model
from prunenet.pipeline import PrunePlan, apply_strategy, scorer_planner
from prunenet.request import PruneRequest
from prunenet.runner import resolve_defaults
from prunenet.scoring.registry import make_scorer

RAMP_SLOPES = "0.1,0.3,0.5"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias or local model folder")
    parser.add_argument("--budget", type=float, default=0.2, help="share of all parameters")
    parser.add_argument(
        "--structures",
        default="ffn,heads,layers",
        help="what the random strategies may take (the ramps take FFN rows)",
    )
    parser.add_argument("--ramps", default=RAMP_SLOPES, help="depth-ramp slopes (FFN rows)")
    parser.add_argument("--random", type=int, default=6, help="random strategies (seeds 0..)")
    parser.add_argument(
        "--spread", type=float, default=0.7, help="standard deviation of the random actions"
    )
    parser.add_argument("--text", default="64x128", type=parse_text, metavar="SEQUENCESxLENGTH",
                        help="the run's own text (64x128)")  # fmt: skip
    parser.add_argument("--scorer", default="policy", help="the cut's row scorer")
    parser.add_argument("--refit", default="lsq", choices=("lsq", "bias", "none"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=None, help="write strategy_proxy.{json,md,png} here")
    args = parser.parse_args(argv)
    try:  # out-of-range sizes: exit 2 with SelfGenConfig's message, not a traceback
        args.selfgen = SelfGenConfig(sequences=args.text[0], length=args.text[1], seed=0)
    except PruneNetError as error:
        parser.error(f"--text: {error}")
    args.slopes = [float(slope) for slope in args.ramps.split(",") if slope.strip()]
    if args.random < 0:
        parser.error("--random must be at least 0")
    return args


def candidates(context, budget: float, structures, slopes, random: int, spread: float) -> list:
    """The uniform cut, a ramp per slope and `random` random strategies (seeded 0, 1, ...)."""
    count = context.layer_count
    out = [realise(uniform_actions(count), budget, context.costs, ("ffn",), source="uniform")]
    for slope in slopes:
        strategy = realise(depth_ramp_actions(count, slope), budget, context.costs, ("ffn",),
                           source=f"ramp {slope:g}")  # fmt: skip
        out.append(strategy)
    for seed in range(random):
        actions = np.random.default_rng(seed).normal(0.0, spread, size=(count, 3))
        out.append(realise(actions, budget, context.costs, structures, source=f"random {seed}"))
    return out


def describe(strategy) -> str:
    heads = sum(strategy.query_heads)
    parts = [f"{sum(strategy.ffn_rows):,} FFN rows"]
    if heads:
        parts.append(f"{heads} query heads")
    if strategy.layers:
        parts.append(f"layers {','.join(map(str, strategy.layers))} dropped")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    structures = parse_structures(args.structures, model.config)
    check_budget(model, args.budget, structures)
    start = time.perf_counter()
    tokens = analysis_text(model, args.selfgen)
    context = strategy_context(model, tokens, args.refit != "none", describe=False)
    print(f"text and context in {time.perf_counter() - start:.0f} s", flush=True)
    scorer = make_scorer(args.scorer)
    # The analysis prune would run this scorer with in memory.
    request = resolve_defaults(PruneRequest(scorer=args.scorer, refit=args.refit), scorer, "memory")
    analysis = request.analysis
    planner = scorer_planner(scorer, analysis=analysis)
    rows = []
    for strategy in candidates(
        context, args.budget, structures, args.slopes, args.random, args.spread
    ):
        row = {"strategy": strategy.source, "what": describe(strategy),
               "params_removed": strategy.params_removed,
               "masked_kl": context.kl(strategy)}  # fmt: skip
        start = time.perf_counter()
        # The masks' own rows with the refit: what the refit alone changes.
        row["mask_rows_refit_kl"] = cut_kl(model, context, mask_rows(context, strategy),
                                           strategy, tokens, args.refit)  # fmt: skip
        # The model prune writes: the scorer's rows (sequential), then the refit.
        row["cut_kl"] = cut_kl(model, context, planner, strategy, tokens, args.refit)
        row["cut_seconds"] = (time.perf_counter() - start) / 2
        rows.append(row)
        print(f"{strategy.source}: masked KL {row['masked_kl']:.4f}, mask rows + refit "
              f"{row['mask_rows_refit_kl']:.4f}, cut {row['cut_kl']:.4f} "
              f"({row['what']}; {row['cut_seconds']:.0f} s per cut)", flush=True)  # fmt: skip
    summary = summarise(rows)
    protocol = {
        "model": args.model, "budget": args.budget, "structures": list(structures),
        "ramps": args.ramps, "random": args.random, "spread": args.spread,
        "text": f"{args.text[0]}x{args.text[1]}",
        "held_out_sequences": int(context.kl_tokens.shape[0]),
        "held_out_tokens": int(context.kl_tokens.numel()), "scorer": args.scorer,
        "analysis": analysis, "refit": args.refit, "threads": args.threads, "device": "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "command": " ".join(["python", "scripts/strategy_proxy.py", *(argv or sys.argv[1:])]),
    }  # fmt: skip
    markdown = to_markdown(rows, summary, protocol)
    print(markdown)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {"protocol": protocol, "summary": summary, "rows": rows}
        (out / "strategy_proxy.json").write_text(json.dumps(record, indent=2) + "\n")
        (out / "strategy_proxy.md").write_text(markdown)
        plot(rows, summary, protocol, out / "strategy_proxy.png")
    return 0


def mask_rows(context, strategy):
    """A planner that ranks each kept layer's FFN rows by the scores the masks used."""
    kept = [i for i in range(context.layer_count) if i not in strategy.layers]

    def plan(model, ratio):
        scores = [context.ffn_scores[i] for i in kept]
        return PrunePlan(scores, [s.numel() for s in scores], {"scorer": "mask rows"})

    return plan


def cut_kl(model, context, planner, strategy, tokens, refit: str) -> float:
    """KL(dense || the model `apply_strategy` cuts) on the strategies' held-out tokens."""
    pruned, _ = apply_strategy(copy.deepcopy(model), planner, strategy, context.head_rank,
                               tokens, in_place=True, refit=refit)  # fmt: skip
    kl, _ = kl_and_perplexity(model, pruned, context.windows, cache=context.reference)
    return kl.mean_kl


def summarise(rows: list[dict]) -> dict:
    """Rank agreement of the masked KL with the cut model's KL, and the regret of the proxy."""
    masked = [row["masked_kl"] for row in rows]
    out = {}
    for column in ("cut_kl", "mask_rows_refit_kl"):
        real = [row[column] for row in rows]
        rho, rho_p = spearmanr(masked, real)
        tau, tau_p = kendalltau(masked, real)
        proxy_pick, best = int(np.argmin(masked)), int(np.argmin(real))
        out[column] = {
            "spearman": float(rho), "spearman_p": float(rho_p),
            "kendall": float(tau), "kendall_p": float(tau_p),
            "proxy_pick": rows[proxy_pick]["strategy"], "real_best": rows[best]["strategy"],
            "regret": real[proxy_pick] / real[best] - 1.0,
        }  # fmt: skip
    return out


def to_markdown(rows: list[dict], summary: dict, protocol: dict) -> str:
    p = protocol
    lines = [
        f"# Masked KL vs the cut model's KL: {p['model']}, {p['budget']:g} of all parameters",
        "",
        f"- strategies: uniform FFN cut, depth ramps {p['ramps']} (FFN "
        f"rows), {p['random']} random per-layer strategies (actions ~ N(0, {p['spread']}), may "
        f"take {', '.join(p['structures'])}); every one meets the budget exactly",
        "- masked KL: the dense model with the strategy as masks (what `--strategy` and the "
        "structure split optimise); mask rows + refit KL: the masks' FFN rows cut and "
        f"refitted ({p['refit']}), so it differs from the masked KL by the refit alone; cut KL: "
        f"the model `apply_strategy` writes (scorer {p['scorer']}, {p['analysis']} analysis, "
        f"refit {p['refit']})",
        f"- both: KL(dense || model) per token on the same {p['held_out_sequences']} held-out "
        f"self-generated sequences ({p['held_out_tokens']} tokens) of a {p['text']} text the "
        f"model wrote (seed 0), never fitted by the refit; CPU, {p['threads']} threads, "
        f"torch {p['torch']}",
        f"- `{p['command']}`",
        "",
        "| strategy | what it removes | masked KL | mask rows + refit KL | cut KL | s per cut |",
        "|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: r["cut_kl"]):
        lines.append(f"| {row['strategy']} | {row['what']} | {row['masked_kl']:.4f} | "
                     f"{row['mask_rows_refit_kl']:.4f} | {row['cut_kl']:.4f} | "
                     f"{row['cut_seconds']:.0f} |")  # fmt: skip
    lines.append("")
    for column, label in (("cut_kl", "cut KL"), ("mask_rows_refit_kl", "mask rows + refit KL")):
        s = summary[column]
        lines.append(
            f"- masked KL vs {label}: Spearman {s['spearman']:.2f} (p {s['spearman_p']:.3f}), "
            f"Kendall {s['kendall']:.2f} (p {s['kendall_p']:.3f}) over {len(rows)} strategies; "
            f"the masked KL picks **{s['proxy_pick']}**, the lowest {label} is "
            f"**{s['real_best']}**: trusting the proxy costs {100 * s['regret']:.1f}% more."
        )
    lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], summary: dict, protocol: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        kind = row["strategy"].split()[0]
        marker = {"uniform": "s", "ramp": "^"}.get(kind, "o")
        axes.scatter(row["masked_kl"], row["cut_kl"], marker=marker, label=kind)
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axes.legend(unique.values(), unique.keys())
    axes.set_xlabel("masked KL (the proxy strategies are chosen by)")
    axes.set_ylabel(f"KL after the cut and refit {protocol['refit']}")
    axes.set_title(f"{protocol['model']}, {protocol['budget']:g} of parameters: Spearman "
                   f"{summary['cut_kl']['spearman']:.2f}")  # fmt: skip
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
