"""How much self-generated text sequential analysis needs: quality and time per token budget.

For one model, ratio and method (default: SmolLM2-135M, 30% of FFN rows, the `selfgen` score
computed sequentially plus the `lsq` refit) it prunes with the model's own text at several
budgets (sequences x 128 tokens; a quarter of the sequences held out to choose the ridge) and
measures, per budget: the time the dense model takes to write the text (cold: nothing cached),
the time the layer-by-layer cut takes once the text exists (warm), perplexity on the three
evaluation domains and KL(dense || pruned) on the same windows. It writes a Markdown table,
JSON and a PNG plot to --out-dir; `ANALYSIS_SELFGEN` (`prunenet.analysis.sequential`) is
chosen from this curve:

    python scripts/benchmark_selfgen_budget.py --sequences 8,16,32,64,128 \\
        --out-dir results/selfgen-budget
    python scripts/benchmark_selfgen_budget.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers

from prunenet import __version__
from prunenet.analysis.selfgen import SelfGenConfig, generate_own_text
from prunenet.analysis.sequential import ANALYSIS_SELFGEN
from prunenet.core.devices import describe_device
from prunenet.core.ratios import validate_ratio
from prunenet.core.refit import REFITS
from prunenet.errors import PruneNetError
from prunenet.evaluation.perplexity import PPL_TASKS
from prunenet.evaluation.speed import parameter_counts
from prunenet.evaluation.suite import EvaluationSuite
from prunenet.io.models import load_model
from prunenet.pipeline import ANALYSES, apply_plan, scorer_planner
from prunenet.scoring.registry import SCORERS, make_scorer
from prunenet.tables import format_table, markdown_table

HEADERS = ["sequences", "tokens", "text s (cold)", "cut s (warm)", "ppl BoolQ", "ppl LAMBADA",
           "ppl code", "KL BoolQ", "KL LAMBADA", "KL code", "params removed"]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias or folder")
    parser.add_argument("--scorer", default="selfgen", choices=sorted(SCORERS))
    parser.add_argument("--analysis", default="sequential", choices=ANALYSES)
    parser.add_argument("--refit", default="lsq", choices=REFITS)
    parser.add_argument("--ratio", type=validate_ratio, default=0.3)
    parser.add_argument("--sequences", default="8,16,32,64,128", help="budgets, comma list")
    parser.add_argument("--length", type=int, default=ANALYSIS_SELFGEN.length)
    parser.add_argument("--ppl-windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default="results/selfgen-budget")
    parser.add_argument("--quick", action="store_true", help="budgets 4,8; 2 windows of 128")
    args = parser.parse_args(argv)
    if args.quick:
        args.sequences, args.ppl_windows, args.seqlen = "4,8", 2, 128
    try:
        args.sequences = [int(part) for part in args.sequences.split(",")]
    except ValueError:
        parser.error(f"--sequences must be whole numbers, got {args.sequences!r}")
    if any(count < 2 for count in args.sequences):
        parser.error("--sequences: each budget needs at least 2 sequences (one is held out)")
    if args.threads < 1 or args.ppl_windows < 1:
        parser.error("--threads and --ppl-windows must be at least 1")
    return args


def measure(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """One row per budget, and the protocol they were measured under."""
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device="cpu")
    suite = EvaluationSuite(tokenizer, PPL_TASKS, [], seqlen=args.seqlen,
                            ppl_windows=args.ppl_windows, cache_reference=True)  # fmt: skip
    scorer = make_scorer(args.scorer, seed=args.seed)
    planner = scorer_planner(scorer, analysis=args.analysis)
    dense_params = parameter_counts(model).total
    rows = []
    for count in args.sequences:
        config = SelfGenConfig(sequences=count, length=args.length, seed=args.seed)
        start = time.perf_counter()
        tokens = generate_own_text(model, config)  # not the cache: this is the cold cost
        text_seconds = time.perf_counter() - start
        start = time.perf_counter()
        plan = planner(model, args.ratio)
        pruned, _ = apply_plan(model, plan, args.ratio, refit=args.refit, tokens=tokens)
        cut_seconds = time.perf_counter() - start
        results = suite.run(pruned, reference=model)
        rows.append(
            {
                "sequences": count,
                "tokens": int(tokens.numel()),
                "text_s": text_seconds,
                "cut_s": cut_seconds,
                **{t: results.perplexity[t].perplexity for t in PPL_TASKS},
                **{f"kl_{t.removeprefix('ppl_')}": results.kl[t].mean_kl for t in PPL_TASKS},
                "params_removed": 1 - parameter_counts(pruned).total / dense_params,
            }
        )
        print(format_table(HEADERS, [display(rows[-1])]), flush=True)
        del pruned
        gc.collect()
    protocol = {
        "command": shlex.join(["python", "scripts/benchmark_selfgen_budget.py", *sys.argv[1:]]),
        "model": args.model,
        "scorer": scorer.describe(),
        "analysis": args.analysis,
        "refit": args.refit,
        "ratio": args.ratio,
        "length": args.length,
        "held_out": "a quarter of the sequences (ridge choice; scores never see them)",
        "ppl_windows": args.ppl_windows,
        "seqlen": args.seqlen,
        "seed": args.seed,
        "threads": args.threads,
        "device": describe_device("cpu"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "prunenet": __version__},
    }  # fmt: skip
    return rows, protocol


def display(row: dict) -> list:
    return [
        row["sequences"], row["tokens"], f"{row['text_s']:.0f}", f"{row['cut_s']:.0f}",
        *(f"{row[t]:.2f}" for t in PPL_TASKS),
        *(f"{row['kl_' + t.removeprefix('ppl_')]:.3f}" for t in PPL_TASKS),
        f"{100 * row['params_removed']:.1f}%",
    ]  # fmt: skip


def write(rows: list[dict], protocol: dict, out_dir: Path) -> list[Path]:
    """JSON, Markdown (table + protocol) and the PNG plot."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"selfgen_budget_{Path(protocol['model']).name}"
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2) + "\n")
    md_path = stem.with_suffix(".md")
    md_path.write_text(
        markdown_table(HEADERS, [display(r) for r in rows])
        + f"\n\nMeasured with `{protocol['command']}`: {protocol['model']}, "
        f"{protocol['scorer']['scorer']} scores ({protocol['analysis']}), refit "
        f"{protocol['refit']}, {protocol['ratio']:.0%} of FFN rows removed in every layer; "
        f"text = sequences x {protocol['length']} tokens the model sampled from its start token "
        f"(seed {protocol['seed']}), {protocol['held_out']}; perplexity and KL(dense || "
        f"pruned) on {protocol['ppl_windows']} windows of {protocol['seqlen']} tokens per "
        f"text; times on {protocol['device']}, {protocol['threads']} thread(s).\n"
    )
    return [json_path, md_path, plot(rows, protocol, stem.with_suffix(".png"))]


def plot(rows: list[dict], protocol: dict, path: Path) -> Path:
    """Perplexity per domain (left) and cold text + warm cut time (right) against tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r["tokens"] for r in rows]
    figure, (quality, cost) = plt.subplots(1, 2, figsize=(11, 4.2))
    for task, label in zip(PPL_TASKS, ("BoolQ passages", "LAMBADA", "Python source"), strict=True):
        quality.plot(tokens, [r[task] for r in rows], "o-", label=label)
    title = f"{protocol['ratio']:.0%} of FFN rows removed"
    quality.set(xscale="log", yscale="log", xlabel="self-generated tokens",
                ylabel="perplexity", title=title)  # fmt: skip
    quality.legend()
    cost.plot(tokens, [r["text_s"] for r in rows], "o-", label="writing the text (cold)")
    cost.plot(tokens, [r["cut_s"] for r in rows], "o-", label="cut + refit (warm)")
    cost.set(xscale="log", xlabel="self-generated tokens", ylabel="seconds",
             title=f"{protocol['threads']} CPU thread(s)")  # fmt: skip
    cost.legend()
    figure.suptitle(f"{protocol['model']}: {protocol['scorer']['scorer']} "
                    f"({protocol['analysis']}) + refit {protocol['refit']}")  # fmt: skip
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows, protocol = measure(args)
    except PruneNetError as error:
        print(f"benchmark_selfgen_budget: {error}", file=sys.stderr)
        return 2
    paths = write(rows, protocol, Path(args.out_dir))
    print(format_table(HEADERS, [display(r) for r in rows]))
    print(f"wrote {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
