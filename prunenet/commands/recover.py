"""`prunenet recover`: distil a pruned model from its dense teacher on the teacher's own text
(LoRA, merged back), and save a folder that loads exactly like the pruned input.

Which teachers are accepted: any causal LM of a supported architecture whose vocabulary is the
student's (equal vocabulary sizes; equal token -> id maps where both folders have a tokenizer).
Depth, width, head counts and even the architecture may differ, since pruning may drop layers and
heads and the loss only compares next-token distributions. Everything that can be refused is
refused (exit code 2) before any training: impossible settings, an `--out` that exists without
`--overwrite` or is locked by another run, missing folders, a mismatched vocabulary (read from
the two configs before any weights are loaded), an unsupported architecture, too little disk.
A student folder without a tokenizer gets the teacher's: that is the tokenizer it was trained
on. The input's `prunenet_report.json` is copied beside `prunenet_recover_report.json`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig

from prunenet.commands.options import positive_int
from prunenet.core.arch import adapter_for
from prunenet.core.compress import count_parameters
from prunenet.core.devices import describe_device, resolve_device
from prunenet.errors import PruneNetError
from prunenet.io.models import ALIASES, load_model, resolve_model_path
from prunenet.io.output_checks import check_free_space
from prunenet.io.saving import hold_output
from prunenet.io.trust import NO_REMOTE_CODE, is_remote_code_error, remote_code_error
from prunenet.recovery.compatibility import check_same_vocabulary
from prunenet.recovery.distill import (
    CALIBRATION_STEPS,
    DEFAULT_LR,
    DEFAULT_TEXT,
    METHODS,
    RecoveryConfig,
    distill,
    merge_adapters,
)
from prunenet.recovery.saving import RECOVER_REPORT_FILE, save_recovered
from prunenet.tables import format_table

DEFAULTS = RecoveryConfig()
# The step cap of a time budget given without --steps: the budget ends training long before.
UNBOUNDED_STEPS = 10**9


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "recover",
        help="recover a pruned model's quality by distilling from its dense model (no data)",
        description=(
            "Fit LoRA adapters on every attention and FFN projection of a pruned model so its "
            "next-token distributions match the dense teacher's (KL(teacher || model)) on text "
            "the teacher writes itself from its start token (no dataset is read); keep the "
            "state with the lowest KL on held-out sequences of that text, merge the adapters "
            "into the weights and save a folder with the input's shapes and config. Built-in "
            "models: " + ", ".join(ALIASES) + "."
        ),
    )
    parser.add_argument("--model", required=True, help="the pruned model: folder, hub id, alias")
    parser.add_argument(
        "--teacher",
        required=True,
        help="the dense model it was pruned from (folder, hub id or alias); any depth and width, "
        "but the same tokenizer",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out model folder (one holding config.json; never another "
        "folder, a file, the current folder, one above it or the home folder)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"optimiser steps of --batch-sequences sequences each (default {DEFAULTS.steps}; "
        "with --budget-minutes, the most steps: none by default)",
    )
    parser.add_argument(
        "--budget-minutes",
        type=positive_float,
        default=None,
        help="train for about this many minutes instead of a step count: the steps are fitted "
        f"to it after the first {CALIBRATION_STEPS}, so the learning rate's cosine ends with "
        "it (loading, the teacher's text and saving come on top)",
    )
    text = parser.add_mutually_exclusive_group()
    text.add_argument(
        "--sequences",
        type=positive_int,
        default=None,
        help=f"self-generated teacher sequences of {DEFAULT_TEXT.length} tokens, a quarter (at "
        f"most {DEFAULTS.held_out_max}) held out (default {DEFAULT_TEXT.sequences}: the text "
        "prunenet prune writes and caches, so it is free after a prune of the same dense model)",
    )
    text.add_argument(
        "--tokens",
        type=positive_int,
        default=None,
        help=f"the same as a token count: rounded up to whole {DEFAULT_TEXT.length}-token "
        "sequences",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=DEFAULTS.method,
        help="lora: low-rank adapters on every projection, merged at the end; full: every "
        "weight but the embeddings trained directly (default %(default)s)",
    )
    parser.add_argument(
        "--rank", type=positive_int, default=DEFAULTS.rank, help="LoRA rank (default %(default)s)"
    )
    parser.add_argument(
        "--alpha",
        type=positive_float,
        default=None,
        help="LoRA alpha: the update is scaled by alpha / rank (default 2 x rank)",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="peak AdamW learning rate, warm-up then cosine to zero (default "
        + ", ".join(f"{rate:g} for {method}" for method, rate in DEFAULT_LR.items())
        + ")",
    )
    parser.add_argument(
        "--batch-sequences",
        type=positive_int,
        default=DEFAULTS.batch_sequences,
        help="sequences per step (default %(default)s)",
    )
    parser.add_argument(
        "--hidden-weight",
        type=non_negative_float,
        default=DEFAULTS.hidden_weight,
        help="weight of a hidden-state term added to the KL: every layer's output matched to "
        "the teacher's, relative squared error per position (0 = KL only; needs a teacher of "
        "the model's depth and width; default %(default)s)",
    )
    parser.add_argument(
        "--eval-every",
        type=positive_int,
        default=DEFAULTS.eval_every,
        help="held-out KL every N steps; the best state is kept (default %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS.seed,
        help="seeds the LoRA initialisation and the batch order (the text keeps its own seed)",
    )
    parser.add_argument("--device", default="cpu", help="where training runs: cpu (default), cuda")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch CPU threads (default 1: on small shared CPUs more threads were slower)",
    )
    parser.set_defaults(run=run)


def positive_float(text: str) -> float:
    """A finite number above 0 (learning rates, LoRA alpha)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def non_negative_float(text: str) -> float:
    """A finite number of at least 0 (the hidden-state weight)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of at least 0")
    return value


def recovery_config(args: argparse.Namespace) -> RecoveryConfig:
    """The library settings for the command line (a `PruneNetError` for impossible ones)."""
    sequences = DEFAULT_TEXT.sequences
    if args.sequences is not None:
        sequences = args.sequences
    elif args.tokens is not None:
        sequences = math.ceil(args.tokens / DEFAULT_TEXT.length)
    steps = args.steps
    if steps is None:
        steps = DEFAULTS.steps if args.budget_minutes is None else UNBOUNDED_STEPS
    return RecoveryConfig(
        steps=steps,
        budget_minutes=args.budget_minutes,
        method=args.method,
        rank=args.rank,
        alpha=args.alpha,
        lr=args.lr,
        batch_sequences=args.batch_sequences,
        eval_every=args.eval_every,
        hidden_weight=args.hidden_weight,
        seed=args.seed,
        text=replace(DEFAULT_TEXT, sequences=sequences),
    )


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    config = recovery_config(args)  # impossible settings exit 2 before anything is read
    device = resolve_device(args.device)
    with hold_output(args.out, args.overwrite):
        # Every refusal happens in here, before the (long) training: the output lock, missing
        # folders, a teacher with another vocabulary, an unsupported student, too little disk.
        student_path = resolve_model_path(args.model)
        teacher_path = resolve_model_path(args.teacher)
        check_same_vocabulary(_config(student_path), _config(teacher_path))
        start = time.perf_counter()
        student, student_tokenizer = load_model(args.model, device=str(device))
        teacher, teacher_tokenizer = load_model(args.teacher, device=str(device))
        adapter_for(student.config)  # LoRA targets come from the architecture adapter
        adapter_for(teacher.config)  # so does the teacher's self-generation
        check_same_vocabulary(student.config, teacher.config, student_tokenizer, teacher_tokenizer)
        params = count_parameters(student)
        check_free_space(args.out, sum(p.numel() * p.element_size() for p in student.parameters()))
        load_seconds = time.perf_counter() - start
        print(
            f"model {args.model} ({student.config.model_type}, {params:,} parameters) and teacher "
            f"{args.teacher} loaded in {load_seconds:.1f} s; {_method(config)}, "
            f"{_steps(config)} of {config.batch_sequences} x {config.text.length} tokens, "
            f"lr {config.peak_lr:g}, seed {config.seed}, {describe_device(device)}; text: "
            f"{config.text.sequences} x {config.text.length} tokens the teacher writes itself "
            f"(the text prunenet prune wrote and cached, or written now), "
            f"{config.held_out_sequences} held out",
            flush=True,
        )
        adapted, report = distill(student, teacher, config)
        recovered = merge_adapters(adapted)
        record = {
            **report.to_dict(),
            "model": args.model,
            "teacher": args.teacher,
            "params": params,
            "device": describe_device(device),
            "threads": args.threads,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": importlib.metadata.version("peft"),
            },
        }
        # The tokenizer the model was trained on is the teacher's (verified equal to the
        # model's when both exist), so a folder without one gets the teacher's.
        tokenizer = student_tokenizer if student_tokenizer is not None else teacher_tokenizer
        save_recovered(
            recovered, tokenizer, args.out, record, source=student_path, overwrite=args.overwrite
        )
    print(format_table(HEADERS, [summary_row(report, Path(args.out))]))
    print(f"report: {Path(args.out) / RECOVER_REPORT_FILE}", file=sys.stderr)
    return 0


HEADERS = ["steps", "best step", "held-out KL before", "held-out KL after", "change",
           "train tokens", "held-out tokens", "seconds", "saved to"]  # fmt: skip


def summary_row(report, folder: Path) -> list:
    """One line: the held-out KL(teacher || model) before and after, in nats per token."""
    before, after = report.held_out_kl_before, report.held_out_kl_after
    return [
        report.steps,
        report.best_step,
        f"{before:.4f}",
        f"{after:.4f}",
        f"{100 * (after - before) / before:+.1f}%" if before > 0 else "-",
        report.train_tokens,
        report.held_out_tokens,
        f"{report.seconds:.1f}",
        str(folder),
    ]


def _config(path: str):
    """The config alone (cheap), to refuse a mismatched teacher before loading any weights."""
    try:
        return AutoConfig.from_pretrained(path, **NO_REMOTE_CODE)
    except (OSError, ValueError, KeyError) as error:
        if is_remote_code_error(error):  # a hub id (local folders were refused already)
            raise remote_code_error(path) from None
        raise PruneNetError(
            f"Could not read the config of {path!r} ({type(error).__name__}: {error}). Pass a "
            f"folder written by save_pretrained, a reachable hub id, or an alias: "
            f"{', '.join(ALIASES)}."
        ) from None


def _steps(config: RecoveryConfig) -> str:
    """How long training runs, in a few words."""
    if config.budget_minutes is None:
        return f"{config.steps} steps"
    cap = "" if config.steps == UNBOUNDED_STEPS else f", at most {config.steps}"
    return f"steps for {config.budget_minutes:g} minutes{cap}"


def _method(config: RecoveryConfig) -> str:
    """How the student is trained, in a few words."""
    return f"LoRA rank {config.rank}" if config.method == "lora" else "every weight but embeddings"
