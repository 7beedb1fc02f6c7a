"""`prunenet eval`: perplexity on three domains, KL and speed-up against a reference, zero-shot.

Prints tables whose every number says how it was measured, and with `--json` writes the full
protocol (model, tasks, limits, seqlen, device, threads, library, lm-eval and data versions,
metric definitions, token counts) next to the results, so a number can be reproduced or
compared. Zero-shot accuracy comes from lm-evaluation-harness (`prunenet.evaluation.zero_shot`);
with `--reference DENSE` the KL(dense || model) on the perplexity windows and the speed-up
(dense and model timed alternately in this process) are added. A model card PruneNet wrote
gets the numbers in its Evaluation section.

Why this module is long (over 400 lines): the tables and the JSON record say how every number
was measured, and they must say it from the same fields; split, they would drift apart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from prunenet.commands.options import non_negative_int, positive_int
from prunenet.core.devices import default_device, describe_device
from prunenet.errors import PruneNetError
from prunenet.evaluation.data import data_versions
from prunenet.evaluation.perplexity import DEFAULT_PPL_WINDOWS, DEFAULT_SEQLEN
from prunenet.evaluation.speed import (
    DEFAULT_DECODE_BATCH_SIZES,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PREFILL_TOKENS,
    DEFAULT_ROUNDS,
    SpeedComparison,
    compare_speed,
    parameter_counts,
)
from prunenet.evaluation.suite import (
    DEFAULT_TASKS,
    METRIC_DEFINITIONS,
    EvaluationSuite,
    SuiteResult,
    all_task_names,
    lm_eval_version,
    parse_tasks,
    software_versions,
)
from prunenet.evaluation.vocabulary import embedding_rows, tokenizer_overflow
from prunenet.evaluation.zero_shot import (
    DEFAULT_ZERO_SHOT_BATCH,
    DEFAULT_ZERO_SHOT_LIMIT,
    primary_metric,
    zero_shot_average,
)
from prunenet.io.model_card import CARD_FILE, evaluation_markdown, is_prunenet_card, with_evaluation
from prunenet.io.models import ALIASES, load_model, resolve_model_path
from prunenet.io.output_checks import check_writable_parent
from prunenet.io.saving import REPORT_FILE, atomic_file
from prunenet.tables import format_table


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="measure perplexity, KL and speed-up to a reference, zero-shot accuracy",
        description=(
            "Evaluate a model on offline data (no hub access): perplexity on BoolQ's Wikipedia "
            "passages, LAMBADA's book passages and Python standard-library source; zero-shot "
            "accuracy through lm-evaluation-harness; with --reference, KL(reference || model) "
            "on the same windows and the speed-up (prefill and decode, alternated). Built-in "
            "models: " + ", ".join(ALIASES) + "."
        ),
    )
    parser.add_argument("--model", required=True, help="local folder, hub id, or alias")
    parser.add_argument(
        "--reference",
        default=None,
        help="the dense model it was pruned from (folder, hub id or alias): adds KL and speed-up",
    )
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma list from: {all_task_names()} (default: %(default)s)",
    )
    parser.add_argument(
        "--limit",
        type=non_negative_int,
        default=DEFAULT_ZERO_SHOT_LIMIT,
        help="zero-shot: the first N documents of each task, as lm-eval's --limit; 0 = all "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--ppl-windows",
        type=non_negative_int,
        default=DEFAULT_PPL_WINDOWS,
        help="perplexity windows per text, evenly spaced through it; 0 = the whole text "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--seqlen", type=positive_int, default=DEFAULT_SEQLEN, help="perplexity window"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=1, help="perplexity windows per forward pass"
    )
    parser.add_argument(
        "--zero-shot-batch-size",
        type=positive_int,
        default=DEFAULT_ZERO_SHOT_BATCH,
        help="lm-eval requests per forward pass",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if any)")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help='CPU threads for torch (default 1: see docs/architecture.md, "Findings")',
    )
    parser.add_argument(
        "--speed-rounds",
        type=non_negative_int,
        default=DEFAULT_ROUNDS,
        help="timed rounds per speed measurement (median and range reported); 0 skips speed",
    )
    parser.add_argument("--prefill-tokens", type=positive_int, default=DEFAULT_PREFILL_TOKENS)
    parser.add_argument(
        "--decode-tokens",
        type=positive_int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help="tokens generated per sequence in the decode measurements",
    )
    parser.add_argument("--json", default=None, help="write results and protocol to this file")
    parser.add_argument(
        "--no-update-card",
        dest="update_card",
        action="store_false",
        help="leave the folder's model card as it is (by default a card PruneNet wrote gets "
        "these numbers in its Evaluation section; no other README.md is ever touched)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    ppl_tasks, zero_shot_tasks = parse_tasks(args.tasks)
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
    check_tokenizer_fits(model, tokenizer, args.model)
    reference = None
    if args.reference:
        reference, _ = load_model(args.reference, device=device)
        check_same_vocabulary(model, reference, args.reference)
    counts = parameter_counts(model)
    suite = EvaluationSuite(
        tokenizer,
        ppl_tasks,
        zero_shot_tasks,
        seqlen=args.seqlen,
        ppl_windows=args.ppl_windows,
        limit=args.limit,
        batch_size=args.batch_size,
        zero_shot_batch_size=args.zero_shot_batch_size,
    )
    where = f"{describe_device(device)}, {torch.get_num_threads()} thread(s)"
    print(
        f"model {args.model} ({model.config.model_type}, {counts.total:,} params, FFN "
        f"{counts.ffn:,} = {100 * counts.ffn_fraction:.1f}%) on {where}",
        file=sys.stderr,
    )
    results = suite.run(model, reference, progress=_progress)
    speed = None
    if args.speed_rounds:
        speed = compare_speed(
            reference,
            model,
            prefill_tokens=args.prefill_tokens,
            max_new_tokens=args.decode_tokens,
            decode_batch_sizes=DEFAULT_DECODE_BATCH_SIZES,
            rounds=args.speed_rounds,
        )
    wall = time.perf_counter() - started

    print(summary_tables(args, results, suite, speed, where))
    print(f"wall time {wall:.1f} s")
    record = protocol_record(args, model, tokenizer, suite, results, counts, speed, device)
    record["wall_seconds"] = wall
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(record, indent=2))
        print(f"wrote {json_path}")
    if args.update_card:
        update_card(Path(resolve_model_path(args.model)), record)
    return 0


def update_card(folder: Path, record: dict) -> bool:
    """Write the evaluation into the folder's model card, when the card is one PruneNet wrote
    (a README.md of anyone else is never touched); atomic, like every write.

    :param folder: the evaluated model's folder.
    :param record: `protocol_record`'s result.
    :return: whether the card was updated.
    """
    if not folder.is_dir() or not is_prunenet_card(folder):
        return False
    card = folder / CARD_FILE
    try:
        with atomic_file(card) as staging:
            staging.write_text(with_evaluation(card.read_text(), evaluation_markdown(record)))
    except OSError as error:
        print(f"could not update the model card {card} ({error}); the numbers are above",
              file=sys.stderr)  # fmt: skip
        return False
    print(f"wrote the evaluation into {card}")
    return True


def check_tokenizer_fits(model: torch.nn.Module, tokenizer, spec: str) -> None:
    """Refuse a tokenizer with ids the model's embedding lacks, before anything is evaluated
    (otherwise the first such token fails deep inside the forward pass).

    :param model: the loaded model.
    :param tokenizer: the tokenizer loaded beside it.
    :param spec: what --model said, for the message.
    """
    problem = tokenizer_overflow(tokenizer, embedding_rows(model))
    if problem:
        raise PruneNetError(
            f"Model {spec} cannot be evaluated: {problem}. The tokenizer files are not this "
            "model's; copy the tokenizer of the model it was pruned from into the folder."
        )


def check_same_vocabulary(model: torch.nn.Module, reference: torch.nn.Module, spec: str) -> None:
    """Refuse a reference whose vocabulary differs: KL and speed feed both the same token ids.

    :param model: the evaluated model.
    :param reference: the loaded --reference model.
    :param spec: what --reference said, for the message.
    """
    sizes = [m.get_input_embeddings().num_embeddings for m in (model, reference)]
    if sizes[0] != sizes[1]:
        raise PruneNetError(
            f"--reference {spec} has a vocabulary of {sizes[1]:,} tokens, the model {sizes[0]:,}; "
            "give the dense model the evaluated one was pruned from."
        )


def check_json_path(path: Path) -> None:
    """Refuse a --json path that cannot be written, before the (long) evaluation starts."""
    if path.is_dir():
        raise PruneNetError(f"--json {path} is a folder; give a file name.")
    if path.exists() and not os.access(path, os.W_OK):
        raise PruneNetError(f"--json {path} exists and is not writable; choose another file.")
    check_writable_parent(path)


def summary_tables(
    args: argparse.Namespace,
    results: SuiteResult,
    suite: EvaluationSuite,
    speed: SpeedComparison | None,
    where: str,
) -> str:
    """Perplexity (and KL), zero-shot and speed tables, each titled with how it was measured.

    :param args: the command's arguments.
    :param results: what the suite measured.
    :param suite: the suite (its protocol names windows, BOS, limits).
    :param speed: the speed measurement (None when skipped).
    :param where: device and threads.
    """
    protocol = suite.protocol()
    parts = [f"{args.model} on {where}"]
    if results.perplexity:
        rows = []
        for task, ppl in results.perplexity.items():
            kl = results.kl.get(task)
            rows.append(
                [
                    task,
                    round(ppl.perplexity, 3),
                    "" if kl is None else f"{kl.mean_kl:.4f}",
                    "" if kl is None else f"{kl.max_kl:.2f}",
                    f"{ppl.windows}/{ppl.windows_available} windows x {ppl.seqlen}",
                    ppl.scored_tokens,
                    round(ppl.seconds, 1),
                ]
            )
        headers = ["text", "perplexity", "KL mean", "KL max", "sample", "scored tokens", "s"]
        kl_note = f"; KL(reference {args.reference} || model) in nats/token" if results.kl else ""
        parts.append(
            f"perplexity: windows of {suite.seqlen} tokens evenly spaced through each text, BOS "
            f"{protocol['ppl_bos_token'] or 'none'} prepended{kl_note}\n"
            + format_table(headers, rows)
        )
    if results.zero_shot is not None:
        record = results.zero_shot
        rows = []
        for task, entry in record["tasks"].items():
            norm = entry["acc_norm"]
            rows.append(
                [
                    task,
                    _with_stderr(entry["acc"], entry["acc_stderr"]),
                    "" if norm is None else _with_stderr(norm, entry["acc_norm_stderr"]),
                    primary_metric(entry),
                    f"first {entry['items']}/{entry['items_available']} ({entry['split']})",
                    entry["version"],
                ]
            )
        average, stderr = zero_shot_average(record["tasks"])
        headers = ["task", "acc ± stderr", "acc_norm ± stderr", "score", "items", "task version"]
        bos = "tokenizer default (adds BOS)" if record["protocol"]["tokenizer_adds_bos"] else (
            "tokenizer default (no BOS)"
        )  # fmt: skip
        parts.append(
            f"zero-shot: lm-evaluation-harness {record['lm_eval_version']}, 0-shot, first "
            f"{suite.limit or 'all'} documents per task, BOS: {bos}\n"
            + format_table(headers, rows)
            + "\naverage of the task scores (acc_norm where defined, else acc): "
            + _with_stderr(average, stderr)
        )
    if speed is not None:
        parts.append(speed_table(speed))
    return "\n\n".join(parts)


def speed_table(speed: SpeedComparison) -> str:
    """Tokens/s (median [min-max] over the rounds) per measurement, and the speed-up.

    :param speed: from `compare_speed`.
    """
    rows = []
    for row in speed.rows:
        reference = "" if row.reference is None else _spread(row.reference)
        rows.append(
            [
                f"{row.measurement} b{row.batch_size}",
                _spread(row.model),
                reference,
                "" if row.speedup is None else f"{row.speedup:.3f}",
                "" if row.paired_speedup is None else f"{row.paired_speedup:.3f}",
            ]
        )
    headers = ["measurement", "model tok/s", "reference tok/s", "speed-up", "paired"]
    alternated = "alternated with the reference (ABBA)" if speed.rows[0].reference else "alone"
    title = (
        f"speed: {speed.rounds} rounds after {speed.warmup} warm-up, {alternated}; median "
        f"[min-max] tokens/s; prefill = 1 x {speed.prefill_tokens} random tokens, decode = greedy "
        f"{speed.max_new_tokens} new tokens after {speed.prompt_tokens}; {speed.device}, "
        f"{speed.threads} thread(s)"
    )
    return title + "\n" + format_table(headers, rows)


def _spread(spread) -> str:
    return f"{spread.median:,.1f} [{spread.minimum:,.1f}-{spread.maximum:,.1f}]"


def _with_stderr(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


def protocol_record(
    args: argparse.Namespace,
    model: torch.nn.Module,
    tokenizer: object,
    suite: EvaluationSuite,
    results: SuiteResult,
    counts,
    speed: SpeedComparison | None,
    device: str,
) -> dict:
    """Everything that defines the numbers, in one JSON-ready dict.

    :param args: the command's arguments.
    :param model: the evaluated model.
    :param tokenizer: its tokenizer.
    :param suite: the suite that measured it.
    :param results: the measurements.
    :param counts: its `ParameterCounts`.
    :param speed: the speed measurement (None when skipped).
    :param device: the device the model ran on.
    """
    path = resolve_model_path(args.model)
    report_file = Path(path) / REPORT_FILE
    pruning = json.loads(report_file.read_text()) if report_file.is_file() else None
    average, stderr = zero_shot_average(results.zero_shot["tasks"] if results.zero_shot else {})
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
        "reference": args.reference,
        "tasks": [*suite.ppl_tasks, *suite.zero_shot_tasks],
        "protocol": suite.protocol(),
        "tokenizer": type(tokenizer).__name__,
        "device": describe_device(device),
        "threads": torch.get_num_threads(),
        "versions": software_versions(),
        "lm_eval_version": lm_eval_version(),
        "data_packages": data_versions(),
        "metric_definitions": METRIC_DEFINITIONS,
        "results": results.to_dict(),
        "perplexity": {task: r.perplexity for task, r in results.perplexity.items()},
        "kl": {task: r.mean_kl for task, r in results.kl.items()} or None,
        "zero_shot_average": average,
        "zero_shot_average_stderr": stderr,
        "params": counts.to_dict(),
        "speed": speed.to_dict() if speed is not None else None,
        "speedup": {f"{r.measurement}_b{r.batch_size}": r.speedup for r in speed.rows}
        if speed is not None and args.reference
        else None,
    }


def _progress(task: str, line: str) -> None:
    print(f"  {task}: {line}", file=sys.stderr, flush=True)
