"""`prunenet eval`: perplexity, zero-shot accuracy, size and speed of a model, with its protocol.

Prints a table whose every number says how it was measured, and with `--json` writes the full
protocol (model, tasks, limits, seqlen, seed, device, threads, library and data versions, metric
definitions, token counts) next to the results, so a number can be reproduced or compared.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers.utils import logging as hf_logging

from prunenet import __version__
from prunenet.commands.options import non_negative_int, positive_int
from prunenet.core.devices import default_device, describe_device
from prunenet.errors import PruneNetError
from prunenet.evaluation.data import DEFAULT_TASKS, all_task_names, data_versions, parse_tasks
from prunenet.evaluation.perplexity import DEFAULT_PPL_WINDOWS, DEFAULT_SEQLEN, PerplexityResult
from prunenet.evaluation.speed import (
    DEFAULT_SPEED_BATCH,
    DEFAULT_SPEED_REPEATS,
    DEFAULT_SPEED_SEQLEN,
    ParameterCounts,
    SpeedResult,
    measure_speed,
    parameter_counts,
)
from prunenet.evaluation.suite import METRIC_DEFINITIONS, EvaluationSuite
from prunenet.evaluation.zero_shot import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_ZERO_SHOT_LIMIT,
    ZeroShotResult,
    zero_shot_average,
)
from prunenet.io.models import ALIASES, load_model, resolve_model_path
from prunenet.io.saving import REPORT_FILE, check_writable_parent
from prunenet.tables import format_table


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="measure perplexity, zero-shot accuracy, size and speed",
        description=(
            "Evaluate a model on offline data (no hub access): perplexity on BoolQ's Wikipedia "
            "passages and LAMBADA's book passages, zero-shot accuracy with lm-eval-harness "
            "prompts and definitions, parameter counts and forward-pass speed. Built-in "
            "models: " + ", ".join(ALIASES) + "."
        ),
    )
    parser.add_argument("--model", required=True, help="local folder, hub id, or alias")
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma list from: {all_task_names()} (default: %(default)s)",
    )
    parser.add_argument(
        "--limit",
        type=non_negative_int,
        default=None,
        help=f"examples per task, as in lm-eval: N zero-shot questions (a seeded sample) and N "
        f"perplexity windows; 0 = everything. Without it: {DEFAULT_ZERO_SHOT_LIMIT} questions and "
        f"{DEFAULT_PPL_WINDOWS} windows",
    )
    parser.add_argument(
        "--ppl-windows",
        type=non_negative_int,
        default=None,
        help="perplexity windows per text, evenly spaced through it (overrides --limit for "
        "perplexity); 0 = the whole text",
    )
    parser.add_argument(
        "--seqlen", type=positive_int, default=DEFAULT_SEQLEN, help="perplexity window"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the zero-shot sample")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        help="sequences per forward pass",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if any)")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="CPU threads for torch (default 1: see DESIGN.md)",
    )
    parser.add_argument("--speed-batch", type=positive_int, default=DEFAULT_SPEED_BATCH)
    parser.add_argument("--speed-seqlen", type=positive_int, default=DEFAULT_SPEED_SEQLEN)
    parser.add_argument(
        "--speed-repeats",
        type=non_negative_int,
        default=DEFAULT_SPEED_REPEATS,
        help="timed forward passes (median reported); 0 skips the speed measurement",
    )
    parser.add_argument("--json", default=None, help="write results and protocol to this file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    tasks = parse_tasks(args.tasks)
    zero_shot_limit, ppl_windows = effective_limits(args.limit, args.ppl_windows)
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    device = args.device or default_device()
    json_path = Path(args.json).expanduser() if args.json else None
    if json_path is not None:
        check_json_path(json_path)

    model, tokenizer = load_model(args.model, device=device)
    if tokenizer is None:
        raise PruneNetError(
            f"Model {args.model} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
            "...); evaluation needs one to read text. Copy the tokenizer of the model it was "
            "pruned from into the folder."
        )
    counts = parameter_counts(model)
    suite = EvaluationSuite(
        tokenizer,
        tasks,
        seqlen=args.seqlen,
        ppl_windows=ppl_windows,
        limit=zero_shot_limit,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    where = f"{describe_device(device)}, {torch.get_num_threads()} thread(s)"
    print(
        f"model {args.model} ({model.config.model_type}, {counts.total:,} params, FFN "
        f"{counts.ffn:,} = {100 * counts.ffn_fraction:.1f}%) on {where}",
        file=sys.stderr,
    )
    results = suite.run(model, progress=_progress)
    speed = None
    if args.speed_repeats:
        speed = measure_speed(model, args.speed_batch, args.speed_seqlen, args.speed_repeats)
    wall = time.perf_counter() - started

    print(summary_table(args.model, results, suite, where))
    average = zero_shot_average(results)
    if average is not None:
        zero_shot_tasks = [t for t, r in results.items() if isinstance(r, ZeroShotResult)]
        print(
            f"zero-shot average of {'/'.join(zero_shot_tasks)} (acc_norm where defined, else acc; "
            f"{suite.limit or 'all'} items per task, seed {suite.seed}): {average:.4f}"
        )
    if speed is not None:
        print(
            f"speed: {speed.tokens_per_second:,.0f} tokens/s, latency {speed.latency_s:.3f} s "
            f"(median of {speed.repeats}) per forward of batch {speed.batch_size} x "
            f"{speed.seqlen} tokens on {speed.device}, {speed.threads} thread(s)"
        )
    print(f"wall time {wall:.1f} s")

    if json_path is not None:
        record = protocol_record(args, model, tokenizer, suite, results, counts, speed, device)
        record["wall_seconds"] = wall
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(record, indent=2))
        print(f"wrote {json_path}")
    return 0


def check_json_path(path: Path) -> None:
    """Refuse a --json path that cannot be written, before the (long) evaluation starts."""
    if path.is_dir():
        raise PruneNetError(f"--json {path} is a folder; give a file name.")
    if path.exists() and not os.access(path, os.W_OK):
        raise PruneNetError(f"--json {path} exists and is not writable; choose another file.")
    check_writable_parent(path)


def effective_limits(limit: int | None, ppl_windows: int | None) -> tuple[int | None, int | None]:
    """(zero-shot items, perplexity windows) from the two flags; None means everything."""
    zero_shot_limit = DEFAULT_ZERO_SHOT_LIMIT if limit is None else limit
    if ppl_windows is None:
        ppl_windows = DEFAULT_PPL_WINDOWS if limit is None else limit
    return zero_shot_limit or None, ppl_windows or None


def summary_table(model_spec: str, results: dict, suite: EvaluationSuite, where: str) -> str:
    """One row per task: the metric, its value, the sample it came from, and the time it took."""
    rows = []
    for task, result in results.items():
        if isinstance(result, PerplexityResult):
            rows.append(
                [
                    task,
                    "perplexity",
                    round(result.perplexity, 3),
                    "",
                    f"{result.windows}/{result.windows_available} windows x {result.seqlen}",
                    result.scored_tokens,
                    round(result.seconds, 1),
                ]
            )
        else:
            norm = "" if result.acc_norm is None else f"{result.acc_norm:.4f}"
            rows.append(
                [
                    task,
                    "acc / acc_norm" if norm else "acc",
                    f"{result.acc:.4f} / {norm}" if norm else f"{result.acc:.4f}",
                    f"±{result.acc_stderr:.3f}",
                    f"{result.items}/{result.items_available} items (seed {result.seed})",
                    result.scored_tokens,
                    round(result.seconds, 1),
                ]
            )
    headers = ["task", "metric", "value", "stderr(acc)", "sample", "scored tokens", "seconds"]
    title = (
        f"{model_spec} on {where}; perplexity: seqlen {suite.seqlen}, BOS "
        f"{suite.protocol()['bos_token'] or 'none'}; zero-shot: lm-eval prompts, 0-shot; data: "
        + ", ".join(f"{name} {version}" for name, version in data_versions().items())
    )
    return title + "\n" + format_table(headers, rows)


def protocol_record(
    args: argparse.Namespace,
    model: torch.nn.Module,
    tokenizer: object,
    suite: EvaluationSuite,
    results: dict,
    counts: ParameterCounts,
    speed: SpeedResult | None,
    device: str,
) -> dict:
    """Everything that defines the numbers, in one JSON-ready dict."""

    path = resolve_model_path(args.model)
    report_file = Path(path) / REPORT_FILE
    pruning = json.loads(report_file.read_text()) if report_file.is_file() else None
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "arguments": {k: v for k, v in vars(args).items() if k != "run"},
        "model": {
            "spec": args.model,
            "path": str(path),
            "model_type": model.config.model_type,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "params_total": counts.total,
            "params_ffn": counts.ffn,
            "ffn_fraction": counts.ffn_fraction,
            "ffn_widths": counts.ffn_widths,
            "pruning_report": pruning,
        },
        "tasks": suite.tasks,
        "limit": args.limit,
        "zero_shot_limit": suite.limit,
        "ppl_windows": suite.ppl_windows,
        "seqlen": suite.seqlen,
        "seed": suite.seed,
        "batch_size": suite.batch_size,
        "bos_token": suite.protocol()["bos_token"],
        "tokenizer": type(tokenizer).__name__,
        "device": describe_device(device),
        "threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "prunenet": __version__,
        },
        "data_packages": data_versions(),
        "evaluation_harness": (
            "lm-evaluation-harness definitions and prompts reimplemented in prunenet.evaluation "
            "(its hub-based dataset loading does not work offline)"
        ),
        "metric_definitions": METRIC_DEFINITIONS,
        "results": {task: result.to_dict() for task, result in results.items()},
        "zero_shot_average": zero_shot_average(results),
        "params": counts.to_dict(),
        "speed": speed.to_dict() if speed is not None else None,
    }


def _progress(task: str, result) -> None:
    if isinstance(result, PerplexityResult):
        value = f"perplexity {result.perplexity:.3f} on {result.scored_tokens:,} tokens"
    else:
        value = f"acc {result.acc:.4f} on {result.items} items"
    print(f"  {task}: {value} ({result.seconds:.1f} s)", file=sys.stderr, flush=True)
