"""`prunenet prune`: flags -> one `PruneRequest` -> `prunenet.runner.prune` -> a summary table.

The command decides nothing itself: every default is `PruneRequest`'s, every check is the
request's or the runner's, so `prunenet.prune(model, out, request)` from Python writes the same
folder. Rare options live in a JSON request file (`--config`); the flags of earlier releases
are still read (hidden from `--help`) and mapped onto the same request fields.

Why this module is long (over 400 lines): the help texts, the earlier flags' mapping and the
three summary tables are the command's whole job; none of it is decided here.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from prunenet.commands.options import integer, positive_int
from prunenet.core.ratios import validate_ratio
from prunenet.errors import PruneNetError, clip
from prunenet.io.models import ALIASES
from prunenet.request import (
    DTYPES,
    REFITS,
    ROUTES,
    SCORERS,
    STRATEGIES,
    STRUCTURES,
    PruneRequest,
    default_of,
    echo,
    parse_structure_names,
    read_request_file,
)
from prunenet.runner import PruneResult, command_line, prune
from prunenet.tables import format_table

HELP_EPILOG = (
    "Rare options go in a JSON request file (--config FILE): analysis (sequential | oneshot | "
    "shared), max_layer_ratio, search_evaluations, compute_dtype, text_route; flags given "
    "beside --config override it. Every output folder holds prunenet_request.json, which "
    "--config replays. docs/method.md and docs/strategies.md explain every option."
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="prune a model's FFN rows, attention heads and layers, and save it",
        description=(
            "Remove a share of the FFN rows of every layer (--ratio), a share of all parameters "
            "(--remove-params, split between --structures), or enough for a speed-up "
            "(--target-speedup), from the model's own weights and the text it writes itself; "
            "save a folder that AutoModelForCausalLM.from_pretrained loads. Built-in offline "
            "models: " + ", ".join(f"{k} ({v.description})" for k, v in ALIASES.items())
        ),
        epilog=HELP_EPILOG,
    )
    # Request fields default to "not given" (SUPPRESS), so that only what the user typed
    # overrides the request: the defaults live in PruneRequest alone.
    given = argparse.SUPPRESS
    parser.add_argument("--model", default=given, help="local folder, hub id, or built-in alias")
    parser.add_argument(
        "--out",
        required=True,
        help="output folder; with several amounts, one subfolder per amount (ratio-0.30, "
        "params-0.20, ...), each written whole or not at all. An interrupted run keeps the "
        "subfolders it finished, and rerunning the same command resumes: subfolders already "
        "complete for the same request are skipped, the rest are written",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out model folder (one holding config.json; never another "
        "folder, a file, the current folder, one above it or the home folder); with several "
        "amounts, the subfolders another request made",
    )
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument(
        "--ratio",
        type=parse_amounts,
        default=given,
        help="share of FFN rows removed from every layer, in (0, 1); a comma list writes one "
        "folder per value from one text",
    )
    amount.add_argument(
        "--remove-params",
        type=parse_amounts_or_file,
        default=given,
        help="share of ALL parameters removed, in (0, 1), split between --structures; a comma "
        "list, or a file of budgets (one a line, or a JSON list), writes one folder per budget",
    )
    amount.add_argument(
        "--target-speedup",
        type=float,
        default=given,
        help="a batch-1 prefill speed-up over the dense model (> 1): the smallest FFN ratio "
        "timed that fast here is pruned (timing is noisy: check with prunenet eval --reference)",
    )
    parser.add_argument(
        "--structures",
        type=_structures,
        default=given,
        help=f"with --remove-params: what may go, a comma list of {', '.join(STRUCTURES)} "
        f"(default {','.join(default_of('structures'))})",
    )
    parser.add_argument(
        "--strategy",
        default=given,
        metavar="{" + ",".join(STRATEGIES) + "} or CKPT",
        help="how much in which layer. With --ratio: uniform (default; loads with plain "
        "transformers) or auto (more where the model's own output changes least). With "
        "--remove-params: uniform, ramp (rising with depth), policy (the bundled strategy "
        "policy; or give a strategy checkpoint's path), search. Non-uniform folders load with "
        "prunenet.load_pruned",
    )
    parser.add_argument(
        "--scorer",
        default=given,
        metavar="{" + ",".join(SCORERS) + "} or CKPT",
        help="which rows go: policy (default: the bundled PPO row policy), selfgen, magnitude, "
        "random, or a `prunenet train` checkpoint's path",
    )
    parser.add_argument(
        "--refit",
        choices=REFITS,
        default=given,
        help="repair each cut layer's FFN output on the model's own text: lsq (default; ridge "
        "least squares), bias, none (the default when streaming)",
    )
    parser.add_argument(
        "--route",
        choices=ROUTES,
        default=given,
        help="memory (the whole model), layerwise (the default path, one decoder layer in "
        "memory: for models larger than RAM), stream (weights-only scorers, one layer at a "
        "time), auto (default: memory unless the checkpoint is over half the available RAM)",
    )
    parser.add_argument(
        "--text",
        type=parse_text,
        default=given,
        metavar="SEQUENCESxLENGTH",
        help=f"the model's own text the scores and the refit read (default "
        f"{default_of('text_sequences')}x{default_of('text_length')}; written once, cached)",
    )
    parser.add_argument("--seed", type=int, default=given, help="seed (default 0)")
    parser.add_argument("--device", default=given, help="cpu (default) or cuda")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=given,
        help="dtype of the run and the saved folder; auto (default) keeps the checkpoint's",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=given,
        help="torch CPU threads (default: every core this process may use)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="a JSON request: a flat object of options, or a folder's prunenet_request.json "
        "to replay it (its model too, unless --model is given)",
    )
    _register_earlier_flags(parser)
    parser.set_defaults(run=run)


def _register_earlier_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of earlier releases, kept so that scripts keep working; hidden from --help. Each
    maps onto one request field (`request_from_arguments`)."""
    hidden, given = argparse.SUPPRESS, argparse.SUPPRESS
    parser.add_argument("--requests", dest="remove_params_file", type=parse_amounts_or_file,
                        default=given, help=hidden)  # fmt: skip
    parser.add_argument("--allocation", choices=("uniform", "auto"), default=given, help=hidden)
    parser.add_argument("--policy", default=given, help=hidden)
    parser.add_argument("--strategy-policy", default=given, help=hidden)
    parser.add_argument("--stream", action="store_true", default=given, help=hidden)
    parser.add_argument("--layerwise", action="store_true", default=given, help=hidden)
    # Plain integers: the request gives their true range (positive_int would say "at least 1").
    parser.add_argument("--selfgen-sequences", "--refit-sequences", dest="text_sequences",
                        type=integer, default=given, help=hidden)  # fmt: skip
    parser.add_argument("--selfgen-length", dest="text_length", type=integer,
                        default=given, help=hidden)  # fmt: skip
    parser.add_argument("--analysis", default=given, help=hidden)
    parser.add_argument("--max-layer-ratio", type=float, default=given, help=hidden)
    parser.add_argument("--search-evaluations", type=positive_int, default=given, help=hidden)
    parser.add_argument("--compute-dtype", default=given, help=hidden)
    parser.add_argument("--text-route", default=given, help=hidden)


def run(args: argparse.Namespace) -> int:
    request, model = request_from_arguments(args)
    results = prune(
        model,
        args.out,
        request,
        overwrite=args.overwrite,
        command=command_line(args.argv) if hasattr(args, "argv") else None,
        say=lambda line: print(line, flush=True),
    )
    print(summary_table(request, results))
    return 0


def request_from_arguments(args: argparse.Namespace) -> tuple[PruneRequest, str]:
    """The request the flags (and `--config`) describe, and the model it runs on.

    :param args: parsed flags; request fields the user did not type are absent.
    :return: the request (not yet validated: `prune` does it) and the model spec.
    """
    request, model = PruneRequest(), None
    if args.config:
        request, model = read_request_file(args.config)
    given = vars(args)
    changes = {name: given[name] for name in _FIELD_FLAGS if name in given}
    if "text" in given:
        changes["text_sequences"], changes["text_length"] = given["text"]
    if "remove_params_file" in given:
        changes["remove_params"] = given["remove_params_file"]
    changes.update(_earlier_flags(given))
    if {"ratio", "remove_params", "target_speedup"} & set(changes):
        # An amount on the command line replaces the config's amount (whichever kind it was).
        request = request.replace(ratio=None, remove_params=None, target_speedup=None)
    model = given.get("model", model)
    if model is None:
        raise PruneNetError("Name the model to prune with --model (or in the --config file).")
    return request.replace(**changes), model


# Flags whose destination is the request field of the same name.
_FIELD_FLAGS = ("ratio", "remove_params", "target_speedup", "structures", "strategy", "scorer",
                "refit", "route", "seed", "device", "dtype", "threads", "text_sequences",
                "text_length", "analysis", "max_layer_ratio", "search_evaluations",
                "compute_dtype", "text_route")  # fmt: skip


def _earlier_flags(given: dict) -> dict:
    """Request fields from the flags of earlier releases (`_register_earlier_flags`)."""
    changes = {}
    if "allocation" in given:
        if "strategy" in given and given["strategy"] != given["allocation"]:
            raise PruneNetError(
                "--allocation is the older name of --strategy uniform/auto; give --strategy only."
            )
        changes["strategy"] = given["allocation"]
    if "strategy_policy" in given:
        if given.get("strategy") != "policy":
            raise PruneNetError("--strategy-policy is only read with --strategy policy.")
        changes["strategy"] = given["strategy_policy"]
    if "policy" in given:
        changes["scorer"] = given["policy"]
    if given.get("stream") and given.get("layerwise"):
        raise PruneNetError(
            "--layerwise and --stream are two bounded-memory routes: --route layerwise for the "
            "default (activation-based) path, --route stream for weights-only scorers. Pick one."
        )
    if given.get("stream"):
        changes["route"] = "stream"
    if given.get("layerwise"):
        changes["route"] = "layerwise"
    return changes


def parse_amounts(text: str) -> tuple[float, ...]:
    """'0.3' or '0.1,0.2,0.3' -> floats (ranges and repeats are the request's to check, with
    messages in its own terms).

    :param text: a comma list of numbers.
    """
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{clip(text)!r} is not a number or a comma list of numbers (e.g. 0.2 or 0.1,0.2)"
        ) from None


def parse_amounts_or_file(text: str) -> tuple[float, ...]:
    """`parse_amounts`, or the budgets in a file: one fraction a line (blank lines and #
    comments skipped) or a JSON list.

    :param text: a comma list of numbers, or a file's path.
    """
    path = Path(text).expanduser()
    if not _is_file(path):
        try:
            return parse_amounts(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"cannot read {clip(text)}: it is neither a comma list of numbers (0.1,0.2) "
                "nor a file of budgets"
            ) from None
    try:
        content = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {error}") from None
    try:
        values = json.loads(content) if content.lstrip().startswith("[") else None
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{path} is not a JSON list: {error}") from None
    if values is None:
        values = [line.split("#")[0].strip() for line in content.splitlines()]
        values = [v for v in values if v]
    if not values or not all(isinstance(v, (str, int, float)) for v in values):
        raise argparse.ArgumentTypeError(f"{path} holds no budgets (fractions in (0, 1)).")
    return parse_amounts(",".join(str(v) for v in values))


def parse_ratios(text: str) -> list[float]:
    """'0.3' or '0.1,0.2,0.3' -> shares of FFN rows in (0, 1), none twice (usage errors
    otherwise). Used by commands that take ratios outside a request (`prunenet pareto`).

    :param text: a comma list of ratios.
    """
    try:
        ratios = [validate_ratio(clip(part)) for part in text.split(",")]
    except PruneNetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    repeated = [value for value, count in Counter(ratios).items() if count > 1]
    if repeated:
        raise argparse.ArgumentTypeError(
            f"Values {echo(repeated)} repeat a value of the list; list each one once."
        )
    return ratios


def _is_file(path: Path) -> bool:
    """Whether `path` is a file; a list of thousands of budgets is no file name (stat refuses
    it with ENAMETOOLONG)."""
    try:
        return path.is_file()
    except OSError:
        return False


def parse_text(text: str) -> tuple[int, int]:
    """'256x256' -> (sequences, tokens per sequence).

    :param text: `SEQUENCESxLENGTH`.
    """
    try:
        sequences, length = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not SEQUENCESxLENGTH (e.g. 256x256: 256 sequences of 256 tokens)"
        ) from None
    return sequences, length


def _structures(text: str) -> tuple[str, ...]:
    try:
        return parse_structure_names(text)
    except PruneNetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# ----- the summary table ------------------------------------------------------------------------


def summary_table(request: PruneRequest, results: list[PruneResult]) -> str:
    """What each folder holds: one row per amount, in the request's terms.

    :param request: the request as given.
    :param results: the runner's results.
    """
    if results and results[0].strategy is not None:
        return format_table(STRATEGY_HEADERS, [strategy_row(r) for r in results])
    if request.remove_params is not None:
        return format_table(BUDGET_HEADERS, [budget_row(r) for r in results])
    return format_table(SUMMARY_HEADERS, [summary_row(r) for r in results])


SUMMARY_HEADERS = ["ratio", "layers", "d_ff", "d_ff after", "params", "params after",
                   "FFN rows removed", "params removed", "seconds", "saved to"]  # fmt: skip


def summary_row(result: PruneResult) -> list:
    """One line of the --ratio summary (both the FFN share and the parameter share)."""
    report = result.report
    return [
        result.amount,
        report.num_layers,
        report.ffn_width_before,
        _widths(report.ffn_widths_after),
        report.params_before,
        report.params_after,
        f"{100 * report.ffn_ratio:.1f}%",
        f"{100 * report.params_removed_fraction:.1f}%",
        f"{report.seconds:.2f}",
        str(result.folder),
    ]


BUDGET_HEADERS = ["params target", "layers dropped", "heads removed", "FFN rows removed",
                  "params", "params after", "params removed", "seconds", "saved to"]  # fmt: skip


def budget_row(result: PruneResult) -> list:
    """One line of the --remove-params summary: where the parameters came from."""
    report, split = result.report, result.report.structures
    heads = f"{split['query_heads']} per group, {split['kv_groups']} KV groups"
    return [
        result.amount,
        ",".join(map(str, split["layers"])) or "-",
        heads if split["query_heads"] or split["kv_groups"] else "-",
        f"{100 * report.ffn_ratio:.1f}%",
        report.params_before,
        report.params_after,
        f"{100 * report.params_removed_fraction:.1f}%",
        f"{report.seconds:.2f}",
        str(result.folder),
    ]


STRATEGY_HEADERS = ["params target", "strategy", "self-gen KL", "layers dropped",
                    "heads removed", "FFN rows removed (min-max per layer)", "params after",
                    "params removed", "seconds", "saved to"]  # fmt: skip


def strategy_row(result: PruneResult) -> list:
    """One line of the ramp / policy / search summary."""
    strategy, report = result.strategy, result.report
    kept = [r for i, r in enumerate(strategy.ffn_rows) if i not in strategy.layers]
    return [
        strategy.target,
        strategy.source,
        f"{strategy.kl:.4f}",
        ",".join(map(str, strategy.layers)) or "-",
        sum(strategy.query_heads) or "-",
        f"{100 * report.ffn_ratio:.1f}% ({min(kept)}-{max(kept)})",
        report.params_after,
        f"{100 * report.params_removed_fraction:.1f}%",
        f"{report.seconds:.2f}",
        str(result.folder),
    ]


def _widths(widths: list[int]) -> str:
    return str(widths[0]) if len(set(widths)) == 1 else f"{min(widths)}-{max(widths)}"
