"""`prunenet pareto`: sweep parameter budgets x per-layer strategies, draw the quality-vs-size and
quality-vs-speed Pareto fronts.

The command only parses, refuses bad requests before the model is read, and prints; the sweep,
the fronts and the files are `prunenet.front`'s, so a script gets the same rows. Every
cut is the one `prunenet prune --remove-params B --strategy S` would save, with prune's defaults
(policy row scores, sequential analysis, lsq refit).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from prunenet.allocation.structures import check_budget
from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.analysis.sequential import ANALYSIS_SELFGEN
from prunenet.commands.options import non_negative_int, positive_int
from prunenet.commands.prune import parse_ratios, parse_text
from prunenet.core.arch import can_store_output_bias
from prunenet.core.devices import describe_device, resolve_device
from prunenet.core.refit import REFITS
from prunenet.errors import PruneNetError
from prunenet.evaluation.perplexity import DEFAULT_SEQLEN, PPL_TASKS
from prunenet.evaluation.speed import DEFAULT_PREFILL_TOKENS
from prunenet.evaluation.suite import all_task_names, parse_tasks
from prunenet.evaluation.zero_shot import DEFAULT_ZERO_SHOT_LIMIT
from prunenet.front import (
    DEFAULT_SPEED_ROUNDS,
    JSON_FILE,
    QUALITIES,
    STRATEGIES,
    ParetoRow,
    SweepSettings,
    check_strategies,
    pareto_suite,
    sweep,
    table,
    write_outputs,
)
from prunenet.io.models import ALIASES, DTYPES, load_model
from prunenet.io.saving import hold_output
from prunenet.pipeline import scorer_planner
from prunenet.request import PruneRequest
from prunenet.rl.strategy import BUNDLED_STRATEGY, load_strategy_policy
from prunenet.runner import build_scorer, resolve_defaults
from prunenet.scoring.registry import SCORERS
from prunenet.tables import format_table

DEFAULT_BUDGETS = "0.1,0.2,0.3"
DEFAULT_PPL_WINDOWS = 8  # half of `prunenet eval`'s 16: a grid evaluates 13 models


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pareto",
        help="sweep parameter budgets x strategies and draw the quality/size/speed Pareto fronts",
        description=(
            "Cut the model at every --remove-params budget with every --strategies strategy "
            "(each cut exactly what `prunenet prune --remove-params B --strategy S` saves), "
            "evaluate each (perplexity on BoolQ, LAMBADA and code, KL(dense || model) on the "
            "same windows, prefill speed-up against the dense model timed alternately), and mark "
            "the non-dominated rows twice: quality vs parameters and quality vs prefill "
            "speed-up. Quality is one number per row (--quality; default the mean over the "
            "texts of ln(perplexity)). Writes pareto.json (every row and the protocol), "
            "pareto.md (the table, front rows marked P and S) and pareto.png (both fronts) into "
            "--out, all at once. Built-in models: " + ", ".join(ALIASES) + "."
        ),
        epilog=(
            "Rarer options: --strategy-policy CKPT (the policy strategy's checkpoint; default "
            "the bundled one), --search-evaluations N (search: strategies measured per budget; "
            "default 32), --speed-rounds N (alternated prefill timing rounds per row, 0 skips "
            f"speed; default {DEFAULT_SPEED_ROUNDS}), --prefill-tokens N (tokens of the timed "
            f"batch-1 prefill; default {DEFAULT_PREFILL_TOKENS})."
        ),
    )
    parser.add_argument("--model", required=True, help="local folder, hub id, or alias")
    parser.add_argument(
        "--remove-params",
        type=parse_budgets,
        default=parse_budgets(DEFAULT_BUDGETS),
        help=f"fractions of ALL parameters to remove, comma list in (0, 1) (default "
        f"{DEFAULT_BUDGETS})",
    )
    parser.add_argument(
        "--strategies",
        type=parse_strategies,
        default=STRATEGIES,
        help=f"comma list from {', '.join(STRATEGIES)} (default all), as `prunenet prune "
        "--strategy`: uniform = the same FFN rows from every layer; ramp = rows rising with "
        "depth, slope by self-generated KL; policy = the strategy policy; search = the best of "
        "--search-evaluations random per-layer strategies. FFN rows only",
    )
    parser.add_argument("--out", required=True, help="output folder (pareto.json, .md, .png)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that holds pareto.json (never another folder, the "
        "current folder, one above it or the home folder)",
    )
    parser.add_argument(
        "--quality",
        default="log_ppl",
        choices=sorted(QUALITIES),
        help="the scalar each front is drawn on: log_ppl (default) = mean over the texts of "
        "ln(perplexity); kl = mean over the texts of KL(dense || model) per token",
    )
    parser.add_argument(
        "--strategy-policy",
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--search-evaluations",
        type=positive_int,
        default=32,
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--scorer",
        default="policy",
        choices=sorted(SCORERS),
        help="how FFN rows are ranked within a layer (default policy, as prune)",
    )
    parser.add_argument(
        "--refit",
        default=None,
        choices=REFITS,
        help="the FFN refit of every cut (default lsq, as prune in memory)",
    )
    parser.add_argument(
        "--text",
        type=parse_text,
        default=None,
        metavar="SEQUENCESxLENGTH",
        help=f"the model's own text of every cut (scores and refit), written once (default "
        f"{ANALYSIS_SELFGEN.sequences}x{ANALYSIS_SELFGEN.length}, as prune; cached)",
    )
    hidden = argparse.SUPPRESS  # rarer options, listed in the epilog; earlier names kept
    parser.add_argument("--selfgen-sequences", type=positive_int,
                        default=ANALYSIS_SELFGEN.sequences, help=hidden)  # fmt: skip
    parser.add_argument("--selfgen-length", type=positive_int, default=ANALYSIS_SELFGEN.length,
                        help=hidden)  # fmt: skip
    parser.add_argument(
        "--tasks",
        default=",".join(PPL_TASKS),
        help=f"comma list from {all_task_names()}; the quality uses the perplexity texts, "
        "zero-shot averages are recorded beside it (default: %(default)s)",
    )
    parser.add_argument(
        "--limit",
        type=non_negative_int,
        default=DEFAULT_ZERO_SHOT_LIMIT,
        help="zero-shot tasks: the first N documents each; 0 = all (default %(default)s)",
    )
    parser.add_argument(
        "--ppl-windows",
        type=positive_int,
        default=DEFAULT_PPL_WINDOWS,
        help="perplexity windows per text, evenly spaced (default %(default)s)",
    )
    parser.add_argument(
        "--seqlen",
        type=positive_int,
        default=DEFAULT_SEQLEN,
        help="tokens per perplexity window (default %(default)s)",
    )
    parser.add_argument(
        "--speed-rounds",
        type=non_negative_int,
        default=DEFAULT_SPEED_ROUNDS,
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--prefill-tokens",
        type=positive_int,
        default=DEFAULT_PREFILL_TOKENS,
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--seed", type=int, default=0, help="search, selfgen and timing seed")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch CPU threads (default 1: on small shared CPUs more were slower)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", *DTYPES),
        help="dtype of the dense model and the cuts (default: the checkpoint's own)",
    )
    parser.set_defaults(run=run)


def parse_budgets(text: str) -> list[float]:
    """'0.1,0.2' -> [0.1, 0.2]: fractions of all parameters in (0, 1), none twice (usage errors
    otherwise)."""
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not 0.0 < value < 1.0:
            raise argparse.ArgumentTypeError(
                f"budget {part.strip()!r} is not a fraction in (0, 1) of all parameters to remove"
            )
    return parse_ratios(text)  # prune's list rules: repeats refused


def parse_strategies(text: str) -> tuple[str, ...]:
    """'uniform,ramp' -> ('uniform', 'ramp'); empty, unknown or repeated names are usage errors."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    try:
        return check_strategies(names)
    except PruneNetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    if args.text is not None:  # --text SEQxLEN, or the earlier two flags
        args.selfgen_sequences, args.selfgen_length = args.text
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    # Everything that can be refused is refused here, before the model is read.
    ppl_tasks, zero_shot_tasks = parse_tasks(args.tasks)
    if not ppl_tasks:
        raise PruneNetError(
            f"--tasks {args.tasks} names no perplexity text; the quality is measured on them: "
            f"add one of {', '.join(PPL_TASKS)}."
        )
    # The scorer and the refit default exactly as `prunenet prune` resolves them in memory.
    request = PruneRequest(remove_params=tuple(args.remove_params), scorer=args.scorer,
                           refit=args.refit, seed=args.seed)  # fmt: skip
    scorer = build_scorer(request)
    resolved = resolve_defaults(request, scorer, "memory")
    args.refit, analysis = resolved.refit, resolved.analysis
    settings = SweepSettings(
        budgets=tuple(args.remove_params),
        strategies=tuple(args.strategies),
        quality=args.quality,
        refit=args.refit,
        selfgen=SelfGenConfig(args.selfgen_sequences, args.selfgen_length, seed=args.seed),
        search_evaluations=args.search_evaluations,
        seed=args.seed,
        speed_rounds=args.speed_rounds,
        prefill_tokens=args.prefill_tokens,
    ).check()
    if args.strategy_policy and "policy" not in settings.strategies:
        raise PruneNetError("--strategy-policy is only read when --strategies includes policy.")
    policy = None
    if "policy" in settings.strategies:
        policy, _ = load_strategy_policy(args.strategy_policy or BUNDLED_STRATEGY)
    device = resolve_device(args.device)
    with hold_output(args.out, args.overwrite, replaces=JSON_FILE):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=str(device))
        if tokenizer is None:
            raise PruneNetError(
                f"Model {args.model} has no tokenizer files; the evaluation needs one to read text."
            )
        for budget in settings.budgets:
            check_budget(model, budget, ("ffn",))
        if args.refit == "bias" and not can_store_output_bias(model.config):
            raise PruneNetError(
                f"--refit bias adds an FFN output bias, which {model.config.model_type} models "
                "cannot store; use --refit lsq or none."
            )
        planner = scorer_planner(scorer, "uniform", analysis=analysis)
        suite = pareto_suite(model, tokenizer, ppl_tasks, zero_shot_tasks, args.seqlen,
                             args.ppl_windows, args.limit)  # fmt: skip
        grid = len(settings.budgets) * len(settings.strategies)
        print(
            f"model {args.model} ({model.config.model_type}): {len(settings.budgets)} budget(s) "
            f"x {len(settings.strategies)} strategy(ies) = {grid} cuts; {scorer.name} scores, "
            f"{analysis} analysis, refit {args.refit}; {args.ppl_windows} x {args.seqlen}-"
            f"token windows/text, {args.speed_rounds} prefill rounds; "
            f"{describe_device(device)}, {torch.get_num_threads()} thread(s)",
            file=sys.stderr,
            flush=True,
        )
        result = sweep(model, planner, suite, settings, policy, progress=_progress)
        result.protocol.update(
            command=command_line(args),
            model=args.model,
            scorer=scorer.describe(),
            analysis=analysis,
            strategy_policy=(str(args.strategy_policy or BUNDLED_STRATEGY)
                             if policy is not None else None),
            zero_shot_tasks=zero_shot_tasks,
        )  # fmt: skip
        paths = write_outputs(result, args.out, args.overwrite)
    headers, rows = table(result)
    print(f"quality = {QUALITIES[settings.quality]}; front: P = quality vs parameters, S = "
          "quality vs prefill speed-up")  # fmt: skip
    print(format_table(headers, rows))
    print(f"wall time {(time.perf_counter() - started) / 60:.1f} min; wrote "
          f"{', '.join(map(str, paths))}")  # fmt: skip
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The run as one command with every option explicit, for the record.

    :param args: the parsed (and defaulted) arguments.
    """
    parts = ["prunenet", "pareto", "--model", args.model,
             "--remove-params", ",".join(f"{b:g}" for b in args.remove_params),
             "--strategies", ",".join(args.strategies), "--quality", args.quality,
             "--search-evaluations", args.search_evaluations, "--scorer", args.scorer,
             "--refit", args.refit, "--text", f"{args.selfgen_sequences}x{args.selfgen_length}",
             "--tasks", args.tasks,
             "--limit", args.limit, "--ppl-windows", args.ppl_windows, "--seqlen", args.seqlen,
             "--speed-rounds", args.speed_rounds, "--prefill-tokens", args.prefill_tokens,
             "--seed", args.seed, "--threads", args.threads, "--device", args.device,
             "--dtype", args.dtype, "--out", args.out]  # fmt: skip
    if args.strategy_policy:
        parts += ["--strategy-policy", args.strategy_policy]
    return shlex.join(map(str, parts))


def _progress(row: ParetoRow) -> None:
    where = "dense" if row.strategy == "dense" else f"{row.budget:g} {row.strategy}"
    ppl = " / ".join(f"{v:.2f}" for v in row.perplexity.values())
    speed = "" if row.speedup_prefill is None else f", prefill speed-up {row.speedup_prefill:.2f}"
    line = f"  {where}: {100 * row.params_removed:.1f}% params removed, ppl {ppl}{speed}"
    tqdm.write(line, file=sys.stderr)  # above the grid's progress bar, not through it
