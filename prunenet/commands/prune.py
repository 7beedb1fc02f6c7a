"""`prunenet prune`: score once, prune at one or several ratios (or parameter budgets), save
reloadable folders.

Why this module is long (over 400 lines): the options' help texts, the refusals that must run
before the model is read, and the in-memory and streaming runs are one command's job.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from prunenet.allocation.budget import DEFAULT_MAX_RATIO
from prunenet.allocation.sensitivity import ALLOCATIONS, SENSITIVITY_RATIOS
from prunenet.allocation.speedup import check_target_speedup, ratio_for_speedup
from prunenet.allocation.strategy import strategy_context
from prunenet.allocation.structures import (
    MAX_FFN_RATIO,
    STRUCTURES,
    check_budget,
    parse_structures,
)
from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.analysis.sequential import ANALYSIS_SELFGEN
from prunenet.analysis.shared import SHARED_HINT_REQUESTS
from prunenet.commands.options import positive_int
from prunenet.core.arch import can_store_output_bias, ffn_width
from prunenet.core.compress import PruneReport, estimated_output_bytes
from prunenet.core.devices import resolve_device
from prunenet.core.ratios import keep_count, validate_ratio
from prunenet.core.refit import REFITS
from prunenet.errors import PruneNetError
from prunenet.io.models import (
    ALIASES,
    DTYPES,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model_path,
)
from prunenet.io.saving import check_free_space, hold_output
from prunenet.io.stream.checkpoint import checkpoint_bytes, load_config
from prunenet.layerwise import TEXT_ROUTES, layerwise_prune
from prunenet.pipeline import (
    ANALYSES,
    check_analysis,
    prune_and_save,
    prune_budgets_and_save,
    prune_strategies_and_save,
    scorer_planner,
)
from prunenet.rl.strategy import (
    BUNDLED_STRATEGY,
    STRATEGIES,
    load_strategy_policy,
    make_strategy,
)
from prunenet.scoring.base import Scorer
from prunenet.scoring.registry import SCORERS, make_scorer
from prunenet.stream import require_weights_only, should_stream, stream_prune
from prunenet.tables import format_table


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="prune a model's FFNs (and heads and layers) and save it",
        description=(
            "Prune the FFN rows of every layer (--ratio), or a share of all parameters split "
            "between FFN rows, attention heads and whole layers (--remove-params, "
            "--structures), and save a folder that AutoModelForCausalLM.from_pretrained loads. "
            "Built-in offline models: "
            + ", ".join(f"{k} ({v.description})" for k, v in ALIASES.items())
        ),
    )
    parser.add_argument("--model", required=True, help="local folder, hub id, or alias")
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument(
        "--ratio",
        type=parse_ratios,
        help="fraction of FFN rows removed from every layer, in (0, 1); a comma list "
        "(0.1,0.2,0.3) scores once and writes one folder per ratio under --out",
    )
    amount.add_argument(
        "--remove-params",
        type=parse_ratios,
        help="fraction of ALL parameters to remove, in (0, 1), split between --structures by "
        "greedy KL per parameter on self-generated text; a comma list writes one folder per "
        "budget (params-0.20, ...). Needs the model in memory",
    )
    amount.add_argument(
        "--target-speedup",
        type=float,
        help="a prefill speed-up over the dense model (> 1, e.g. 1.2): the smallest FFN ratio "
        "whose cut model is timed that much faster here (batch-1 prefill of 256 tokens, "
        "alternated with the dense model, bisected over ratios) is then pruned as --ratio; the "
        "search is recorded in prunenet_report.json. Timing is noisy: check the result with "
        "prunenet eval --reference",
    )
    amount.add_argument(
        "--requests",
        type=parse_requests,
        help="a file of parameter budgets (one fraction a line, or a JSON list): like "
        "--remove-params with a list, the text is written once for all of them; "
        "each budget is cut on its own (sequential analysis) unless --analysis shared analyses "
        "the dense model once for all of them",
    )
    parser.add_argument(
        "--strategy",
        default="uniform",
        choices=STRATEGIES,
        help="with --remove-params/--requests: how much to cut where. uniform (default): the "
        "same FFN rows, heads and layers counts in every layer, split between --structures by "
        "greedy KL per parameter; ramp: FFN rows rising linearly with depth, the slope (0 = "
        "uniform .. 0.5) chosen per request by self-generated KL (6 passes); policy: per-layer "
        "amounts from the bundled strategy policy (PPO, trained on SmolLM2-135M) or "
        "--strategy-policy; search: the best of --search-evaluations random per-layer "
        "strategies by self-generated KL. ramp, policy and search give layers different "
        "widths (load with prunenet.load_pruned, or plain transformers with "
        "trust_remote_code=True)",
    )
    parser.add_argument(
        "--strategy-policy",
        help="a strategy-policy checkpoint (scripts/train_strategy.py) for --strategy policy",
    )
    parser.add_argument(
        "--search-evaluations",
        type=positive_int,
        default=32,
        help="--strategy search: strategies measured per request (one forward pass each)",
    )
    parser.add_argument(
        "--structures",
        default=None,
        help=f"with --remove-params: what may be removed, a comma list of "
        f"{', '.join(STRUCTURES)} (default ffn). heads: query heads from every KV group or "
        "whole KV groups, the same in every layer; layers: whole decoder layers",
    )
    parser.add_argument(
        "--scorer",
        default="policy",
        choices=sorted(SCORERS),
        help="how rows are scored when no --policy is given: policy (default; the PPO policy "
        "that ships with PruneNet), selfgen (activation size on text the model generates "
        "itself), magnitude (weight norms), random",
    )
    parser.add_argument(
        "--policy", help="a `prunenet train` checkpoint (.zip): score rows with the policy"
    )
    parser.add_argument(
        "--allocation",
        default="uniform",
        choices=ALLOCATIONS,
        help="uniform (default): the same ratio in every layer; the folder loads with plain "
        "transformers. auto: remove more rows where the model's own output changes least "
        "(exactly --ratio of all FFN rows in total; lower perplexity); layers then differ in "
        "width and the folder loads with prunenet.load_pruned",
    )
    parser.add_argument(
        "--max-layer-ratio",
        type=parse_max_layer_ratio,
        default=DEFAULT_MAX_RATIO,
        help=f"auto allocation never removes more than this fraction of one layer (default "
        f"{DEFAULT_MAX_RATIO}, at most {SENSITIVITY_RATIOS[-1]})",
    )
    parser.add_argument(
        "--refit",
        default=None,
        choices=REFITS,
        help="repair each layer's FFN output projection after the cut, layer by layer on text "
        "the model writes itself: lsq (default in memory: ridge least squares of the kept "
        "columns, and a bias where the architecture stores one; the start token's massive "
        "activations are reproduced exactly), bias (add the removed rows' mean contribution as "
        "an output bias), none (the plain cut; the default with --stream). Needs the model in "
        "memory",
    )
    parser.add_argument(
        "--analysis",
        default=None,
        choices=ANALYSES,
        help="where activation-based scores come from: sequential (default for activation-"
        "based scorers: layer by layer, each layer's activations from the model whose earlier "
        "layers are already cut, on --selfgen-sequences x --selfgen-length self-generated "
        "tokens), oneshot (the dense model's activations on 8 x 128 tokens; the default for "
        "weights-only scorers and --stream), or shared (for many --requests or budgets; never "
        "the default): the dense model is walked once on the same text and every request is "
        "scored and lsq-refitted from its stored statistics, seconds per request instead "
        "of a layer-by-layer cut each; on SmolLM2 at 10-30%% of "
        "the parameters code perplexity was 1.6-5.6%% higher than sequential, prose -3.4 .. "
        "+3.7%% (README, 'Many requests at once'); FFN rows only, uniform strategy. "
        "Sequential and shared need the model in memory",
    )
    parser.add_argument(
        "--selfgen-sequences",
        "--refit-sequences",
        dest="selfgen_sequences",
        type=positive_int,
        default=ANALYSIS_SELFGEN.sequences,
        help=f"self-generated sequences for sequential analysis and the refit, a quarter "
        f"held out to choose the ridge (default {ANALYSIS_SELFGEN.sequences}; generated once, "
        "then cached)",
    )
    parser.add_argument(
        "--selfgen-length",
        type=positive_int,
        default=ANALYSIS_SELFGEN.length,
        help=f"tokens per self-generated sequence (default {ANALYSIS_SELFGEN.length}; models "
        "with a learned position table write at most as many as it holds)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for random and selfgen scoring")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that is a model folder (holds config.json); never "
        "another folder, a file, the current folder, one above it or the home folder",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="prune a local safetensors folder layer by layer without loading the model "
        "(memory bounded by one layer; weights-only scorers). Chosen automatically when the "
        "checkpoint is larger than half of the available RAM",
    )
    parser.add_argument(
        "--layerwise",
        action="store_true",
        help="the default path (own text, sequential analysis, refit) with one decoder layer in "
        "memory at a time: a local safetensors folder is read layer by layer and each cut "
        "layer is written out before the next is read; the output equals the in-memory run's. "
        "If the model's text is not cached yet, the model is loaded once (in its own dtype) "
        "to write it. Chosen automatically for activation-based scorers when the checkpoint "
        "is larger than half of the available RAM",
    )
    parser.add_argument(
        "--compute-dtype",
        default=None,
        choices=DTYPES,
        help="with --layerwise: the dtype each layer is computed in, when it differs from the "
        "saved one (--dtype); e.g. float32 for a float16/bf16 checkpoint on a CPU, where half-"
        "precision products are several times slower. Each cut layer is rounded to --dtype "
        "before it runs, so later layers see what the saved model computes. Default: --dtype",
    )
    parser.add_argument(
        "--text-route",
        default="auto",
        choices=TEXT_ROUTES,
        help="with --layerwise, how the own text is written when it is not cached: resident "
        "(the whole model loaded in its dtype), streamed (every layer read from the shards at "
        "every token: for a model larger than memory; slower), auto (default: resident when "
        "the checkpoint fits in 80%% of the available memory)",
    )
    parser.add_argument("--device", default="cpu", help="where scoring runs: cpu (default) or cuda")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", *DTYPES),
        help="dtype of the in-memory run and of the saved folder. auto (default): the "
        "checkpoint's own (config.json's dtype; float32 when it names none), so a bf16 model "
        "needs half the memory and stays bf16; statistics and the refit are computed in "
        "float32/float64 either way. --stream always keeps the shards' dtypes",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch CPU threads (default 1: on small shared CPUs 2 threads were 10-130x slower)",
    )
    parser.set_defaults(run=run)


def parse_ratios(text: str) -> list[float]:
    """'0.3' or '0.1,0.2,0.3' -> validated floats (argparse turns errors into usage errors)."""
    try:
        ratios = [validate_ratio(part) for part in text.split(",")]
    except PruneNetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    names = [_folder_name(r) for r in ratios]
    if len(set(names)) != len(names):
        # Two ratios sharing a subfolder would make the second save overwrite or fail late.
        raise argparse.ArgumentTypeError(f"Ratios {text} repeat a value; list each ratio once.")
    return ratios


def output_folders(out: str, ratios: list[float], prefix: str = "ratio") -> list[Path]:
    """One folder for one ratio; `out/ratio-0.30` style subfolders for a list (`params-0.20`
    for parameter budgets)."""
    if len(ratios) == 1:
        return [Path(out)]
    return [Path(out) / _folder_name(r, prefix) for r in ratios]


def _folder_name(ratio: float, prefix: str = "ratio") -> str:
    # Two decimals read best (ratio-0.30), but finer ratios keep all digits so they stay distinct.
    return f"{prefix}-{ratio:.2f}" if float(f"{ratio:.2f}") == ratio else f"{prefix}-{ratio!r}"


def parse_max_layer_ratio(text: str) -> float:
    """A finite fraction in (0, the largest measured layer ratio], refused at parse time."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0.0 < value <= SENSITIVITY_RATIOS[-1]:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a fraction in (0, {SENSITIVITY_RATIOS[-1]}]: the layer ratios the "
            "auto allocation measures stop there"
        )
    return value


def parse_requests(path: str) -> list[float]:
    """Budgets from a file: one fraction a line (blank lines and # comments skipped) or a JSON
    list of fractions."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {error.strerror}") from None
    try:
        values = json.loads(text) if text.lstrip().startswith("[") else None
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{path} is not a JSON list: {error}") from None
    if values is None:
        values = [line.split("#")[0].strip() for line in text.splitlines()]
        values = [v for v in values if v]
    if not values or not all(isinstance(v, (str, int, float)) for v in values):
        raise argparse.ArgumentTypeError(f"{path} holds no budgets (fractions in (0, 1)).")
    return parse_ratios(",".join(str(v) for v in values))


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    if args.requests is not None:
        args.remove_params = args.requests
    if args.target_speedup is not None:
        check_target_speedup(args.target_speedup)
        if args.stream or args.layerwise or args.allocation != "uniform":
            raise PruneNetError(
                "--target-speedup times cut copies of the model in memory with a uniform "
                "allocation; drop --stream / --layerwise / --allocation auto, or give --ratio."
            )
        args.ratio = [MAX_FFN_RATIO]  # a placeholder until the model is timed: one folder
    check_amount(args)
    check_shared(args)
    if args.remove_params is not None:
        folders = output_folders(args.out, args.remove_params, prefix="params")
    else:
        folders = output_folders(args.out, args.ratio)
    device = resolve_device(args.device)
    scorer = build_scorer(args)  # a bad --policy fails here, before the model is read
    if args.analysis is not None:
        check_analysis(args.analysis, scorer)
    if args.stream and args.refit not in (None, "none"):
        raise PruneNetError(
            f"--refit {args.refit} fits each layer on its activations on self-generated text, "
            "which needs the model in memory; drop --stream, or use --refit none with --stream."
        )
    if args.stream and args.analysis not in (None, "oneshot"):
        raise PruneNetError(
            "--analysis sequential runs each layer on self-generated text, which needs the model "
            "in memory; drop --stream, or use --analysis oneshot with a weights-only scorer."
        )
    if args.layerwise:
        check_layerwise(args, scorer)
    check_compute_dtype(args)
    with hold_output(args.out, args.overwrite):
        # Own --out for the whole run: a second run to it exits 2 now, not after its scoring,
        # and cannot replace this run's output. A ratio list's subfolders live inside it.
        if not args.layerwise and _use_stream(args, scorer):
            args.refit, args.analysis = args.refit or "none", args.analysis or "oneshot"
            return _run_stream(args, scorer, folders, device)
        resolve_defaults(args, scorer)
        if args.layerwise:
            return _run_layerwise(args, scorer, folders)
        return _run_in_memory(args, scorer, folders, device)


def check_shared(args: argparse.Namespace) -> None:
    """Point many requests at `--analysis shared`, and refuse what it cannot do, before any
    model is read (`args.structures` is already a tuple)."""
    many = args.requests is not None and len(args.requests) >= SHARED_HINT_REQUESTS
    plain = args.structures == ("ffn",) and args.strategy == "uniform"
    if args.analysis is None and many and plain and not (args.stream or args.layerwise):
        # A hint, not a switch: shared is a speed trade that costs code perplexity at every
        # measured budget, and a default must not lose on any domain.
        print(
            f"prunenet prune: {len(args.requests)} requests, each cut on its own (sequential "
            "analysis, about one prune's time each); --analysis shared answers all of them in "
            "about the time of one, at 1.6-5.6% higher code perplexity on SmolLM2 (README, "
            "'Many requests at once')",
            file=sys.stderr,
            flush=True,
        )
    if args.analysis != "shared":
        return
    if args.stream or args.layerwise:
        raise PruneNetError(
            "--analysis shared keeps every layer's statistics of the dense model in memory; "
            "drop --stream / --layerwise, or use --analysis sequential with --layerwise."
        )
    if args.structures != ("ffn",) or args.strategy != "uniform":
        raise PruneNetError(
            "--analysis shared describes the dense model's FFNs, so it cuts FFN rows with the "
            "same amount in every layer (--structures ffn --strategy uniform); for heads, layers "
            "or per-layer strategies use --analysis sequential."
        )


def check_layerwise(args: argparse.Namespace, scorer: Scorer) -> None:
    """Refuse what --layerwise cannot do, before any model is read."""
    if args.stream:
        raise PruneNetError(
            "--layerwise and --stream are two bounded-memory paths: --layerwise for the "
            "default (activation-based) path, --stream for weights-only scorers. Pick one."
        )
    if args.remove_params is not None:
        raise PruneNetError(
            "--layerwise prunes FFN rows at a --ratio; --remove-params measures KL over the "
            "whole model and needs it in memory. Use --ratio with --layerwise."
        )
    if args.allocation != "uniform":
        raise PruneNetError(
            "--allocation auto measures the whole model's outputs; use --allocation uniform "
            "with --layerwise."
        )
    if scorer.weights_only or args.analysis in ("oneshot", "shared"):
        raise PruneNetError(
            "--layerwise scores each layer on the activations it sees once the earlier layers "
            "are cut (sequential analysis, an activation-based scorer such as the default "
            "policy); for a weights-only scorer or --analysis oneshot use --stream."
        )
    if str(args.device) != "cpu":
        raise PruneNetError("--layerwise runs on the CPU; drop --device or --layerwise.")


def check_compute_dtype(args: argparse.Namespace) -> None:
    """--compute-dtype and --text-route only mean something layer by layer (in memory the model
    is one dtype, and resident)."""
    if args.compute_dtype is not None and not args.layerwise:
        raise PruneNetError(
            "--compute-dtype sets the dtype --layerwise computes each layer in; in memory the "
            "model has one dtype (--dtype). Add --layerwise or drop --compute-dtype."
        )
    if args.text_route != "auto" and not args.layerwise:
        raise PruneNetError(
            "--text-route says how --layerwise writes the own text; in memory the model is "
            "resident anyway. Add --layerwise or drop --text-route."
        )


def check_amount(args: argparse.Namespace) -> None:
    """Refuse combinations of --ratio / --remove-params / --structures that cannot work, before
    any model is read; `args.structures` becomes a tuple."""
    if args.remove_params is None and args.strategy != "uniform":
        raise PruneNetError(
            f"--strategy {args.strategy} decides per-layer amounts for a parameter budget: use "
            "it with --remove-params F (or --requests FILE)."
        )
    if args.strategy_policy and args.strategy != "policy":
        raise PruneNetError("--strategy-policy is only read with --strategy policy.")
    if args.strategy == "policy":
        args.strategy_policy_data = load_strategy_policy(args.strategy_policy or BUNDLED_STRATEGY)
    if args.remove_params is None:
        if args.structures not in (None, "ffn"):
            raise PruneNetError(
                f"--structures {args.structures} needs --remove-params: --ratio is a fraction of "
                "FFN rows and removes nothing else. Use --remove-params F --structures "
                f"{args.structures}."
            )
        args.structures = ("ffn",)
        return
    args.structures = parse_structures(args.structures or "ffn")
    if args.stream:
        raise PruneNetError(
            "--remove-params measures KL on self-generated text, which needs the model in "
            "memory; drop --stream, or use --ratio with --stream."
        )
    if args.allocation != "uniform":
        raise PruneNetError(
            "--remove-params removes the same FFN rows from every layer; --allocation auto "
            "works with --ratio only."
        )
    if args.strategy == "ramp" and args.structures != ("ffn",):
        raise PruneNetError(
            "--strategy ramp spreads FFN rows over the layers and cuts nothing else; drop "
            "--structures, or use --strategy uniform/policy/search for heads and layers."
        )
    if args.strategy != "uniform" and "ffn" not in args.structures:
        raise PruneNetError(
            f"--strategy {args.strategy} decides per-layer FFN amounts (the FFN meets the "
            "budget exactly): include ffn in --structures."
        )


def resolve_defaults(args: argparse.Namespace, scorer: Scorer) -> argparse.Namespace:
    """In memory, the defaults are the measured best path: sequential analysis for scorers
    that read activations (oneshot for weights-only ones) and the lsq refit (README,
    "Results"). Explicit choices are kept."""
    if args.analysis is None:
        args.analysis = "oneshot" if scorer.weights_only else "sequential"
    if args.refit is None:
        args.refit = "lsq"
    return args


def _run_in_memory(args: argparse.Namespace, scorer: Scorer, folders: list[Path], device) -> int:
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=str(device))
    load_seconds = time.perf_counter() - start
    # Everything that can be refused is refused now, before the (slow) scoring.
    width = ffn_width(model.config)
    if args.remove_params is not None:
        parse_structures(",".join(args.structures), model.config)  # heads this model can lose
        for target in args.remove_params:
            check_budget(model, target, args.structures)
        dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        sizes = [int((1 - target) * dense_bytes) for target in args.remove_params]
    else:
        if args.target_speedup is not None:
            search = ratio_for_speedup(model, args.target_speedup)
            args.ratio = [search.ratio]
            print(
                f"target prefill speed-up {args.target_speedup}: ratio {search.ratio} timed at "
                f"{search.speedup:.2f}x ({len(search.trials)} trials, {search.prefill_tokens} "
                f"tokens, batch 1, {search.threads} thread(s), paired median of {search.rounds})",
                flush=True,
            )
        for ratio in args.ratio:
            warn_if_nothing_removed(width, ratio)
        sizes = [estimated_output_bytes(model, ratio) for ratio in args.ratio]
    check_free_space(folders[0], sum(sizes))
    if args.refit == "bias" and not can_store_output_bias(model.config):
        raise PruneNetError(
            f"--refit bias adds an FFN output bias, which {model.config.model_type} models "
            "cannot store (plain from_pretrained would drop it); use --refit lsq, which refits "
            "them without an intercept, or --refit none."
        )
    print(
        f"model {args.model} ({model.config.model_type}) loaded in {load_seconds:.1f} s; "
        f"scoring with {scorer.name} (seed {args.seed}, {device}), {_how_much(args)}, "
        f"{args.analysis} analysis, refit {args.refit}",
        flush=True,
    )
    planner = scorer_planner(scorer, args.allocation, args.max_layer_ratio, args.analysis)
    if args.target_speedup is not None:
        planner = _recording(planner, {"target_speedup": search.to_dict()})
    selfgen = SelfGenConfig(
        sequences=args.selfgen_sequences, length=args.selfgen_length, seed=args.seed
    )
    if args.remove_params is not None and args.strategy != "uniform":
        context = strategy_context(model, args.refit != "none", describe=args.strategy == "policy")
        strategies = [_strategy(args, context, target) for target in args.remove_params]
        reports = prune_strategies_and_save(
            model, tokenizer, planner, strategies, context.head_rank, folders, args.overwrite,
            args.refit, selfgen,
        )  # fmt: skip
        rows = [
            strategy_row(strategy, report, folder)
            for strategy, report, folder in zip(strategies, reports, folders, strict=True)
        ]
        print(format_table(STRATEGY_HEADERS, rows))
        return 0
    if args.remove_params is not None:
        reports = prune_budgets_and_save(
            model, tokenizer, planner, args.remove_params, args.structures, folders,
            args.overwrite, args.refit, selfgen,
        )  # fmt: skip
        rows = [
            budget_row(target, report, folder)
            for target, report, folder in zip(args.remove_params, reports, folders, strict=True)
        ]
        print(format_table(BUDGET_HEADERS, rows))
        return 0
    reports = prune_and_save(
        model, tokenizer, planner, args.ratio, folders, args.overwrite, args.refit, selfgen
    )
    rows = [
        summary_row(ratio, report, folder)
        for ratio, report, folder in zip(args.ratio, reports, folders, strict=True)
    ]
    print(format_table(SUMMARY_HEADERS, rows))
    return 0


def _run_layerwise(args: argparse.Namespace, scorer: Scorer, folders: list[Path]) -> int:
    """The default path one decoder layer at a time, once per ratio (the text is cached)."""
    path = Path(resolve_model_path(args.model))
    if not (path / "config.json").is_file():
        raise PruneNetError(
            f"--layerwise reads a local safetensors folder; {args.model!r} is not one. "
            "Download it first (or save it with save_pretrained)."
        )
    config = load_config(path)
    for ratio in args.ratio:
        warn_if_nothing_removed(ffn_width(config), ratio)
    check_free_space(folders[0], checkpoint_bytes(path) * len(args.ratio))
    dtype = resolve_dtype(str(path), args.dtype)
    compute_dtype = resolve_dtype(str(path), args.compute_dtype or args.dtype)
    tokenizer = load_tokenizer(str(path))
    selfgen = SelfGenConfig(
        sequences=args.selfgen_sequences, length=args.selfgen_length, seed=args.seed
    )
    print(
        f"model {args.model} ({config.model_type}): layer by layer from its safetensors "
        f"({dtype}, computed in {compute_dtype}); scoring with {scorer.name} (seed "
        f"{args.seed}, cpu), uniform allocation, {args.analysis} analysis, refit {args.refit}",
        flush=True,
    )
    planner = scorer_planner(scorer, "uniform", analysis=args.analysis)
    rows = []
    for ratio, folder in zip(args.ratio, folders, strict=True):
        report = layerwise_prune(
            path, folder, planner, ratio, refit=args.refit, selfgen=selfgen, dtype=dtype,
            compute_dtype=compute_dtype, tokenizer=tokenizer, overwrite=args.overwrite,
            text_route=args.text_route,
        )  # fmt: skip
        rows.append(summary_row(ratio, report, folder))
    print(format_table(SUMMARY_HEADERS, rows))
    return 0


def _recording(planner, info: dict):
    """`planner` whose plans also record `info` (it goes into prunenet_report.json)."""

    def plan(model, ratio):
        result = planner(model, ratio)
        result.info.update(info)
        return result

    return plan


def _how_much(args: argparse.Namespace) -> str:
    """How the amount per layer is decided, for the first printed line."""
    if args.remove_params is not None and args.strategy != "uniform":
        return f"{args.strategy} strategy per layer"
    return f"{args.allocation} allocation"


def _strategy(args: argparse.Namespace, context, target: float):
    policy = args.strategy_policy_data[0] if args.strategy == "policy" else None
    return make_strategy(args.strategy, context, target, args.structures, policy,
                         args.search_evaluations, args.seed)  # fmt: skip


STRATEGY_HEADERS = ["params target", "strategy", "self-gen KL", "layers dropped",
                    "heads removed", "FFN rows removed (min-max per layer)", "params after",
                    "params removed", "seconds", "saved to"]  # fmt: skip


def strategy_row(strategy, report: PruneReport, folder: Path) -> list:
    """One line of the --strategy policy/search summary."""
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
        str(folder),
    ]


def warn_if_nothing_removed(width: int, ratio: float) -> int:
    """Rows kept at `ratio` (refusing a ratio that empties the FFN); warn when none go."""
    kept = keep_count(width, ratio)
    if kept == width:
        print(
            f"prunenet prune: warning: ratio {ratio} removes no row of a {width}-row FFN "
            f"(round({1 - ratio:g} x {width}) = {width}), so the output is a full-size copy; "
            f"a ratio of at least {1 / width:.2g} removes one row per layer.",
            file=sys.stderr,
        )
    return kept


def build_scorer(args: argparse.Namespace) -> Scorer:
    """The checkpoint's scorer when --policy is given (PPO or REINFORCE), else the named one."""
    if args.policy:
        from prunenet.scoring.registry import load_scorer_from_checkpoint

        return load_scorer_from_checkpoint(args.policy, device=args.device)
    return make_scorer(args.scorer, seed=args.seed)


SUMMARY_HEADERS = ["ratio", "layers", "d_ff", "d_ff after", "params", "params after",
                   "FFN rows removed", "params removed", "seconds", "saved to"]  # fmt: skip


def summary_row(ratio: float, report: PruneReport, folder: Path) -> list:
    """One line of the summary table (both the FFN ratio and the parameter fraction)."""
    return [
        ratio,
        report.num_layers,
        report.ffn_width_before,
        _widths(report.ffn_widths_after),
        report.params_before,
        report.params_after,
        f"{100 * report.ffn_ratio:.1f}%",
        f"{100 * report.params_removed_fraction:.1f}%",
        f"{report.seconds:.2f}",
        str(folder),
    ]


BUDGET_HEADERS = ["params target", "layers dropped", "heads removed", "FFN rows removed",
                  "params", "params after", "params removed", "seconds", "saved to"]  # fmt: skip


def budget_row(target: float, report: PruneReport, folder: Path) -> list:
    """One line of the --remove-params summary: where the parameters came from."""
    split = report.structures
    heads = f"{split['query_heads']} per group, {split['kv_groups']} KV groups"
    return [
        target,
        ",".join(map(str, split["layers"])) or "-",
        heads if split["query_heads"] or split["kv_groups"] else "-",
        f"{100 * report.ffn_ratio:.1f}%",
        report.params_before,
        report.params_after,
        f"{100 * report.params_removed_fraction:.1f}%",
        f"{report.seconds:.2f}",
        str(folder),
    ]


def _use_stream(args: argparse.Namespace, scorer: Scorer) -> bool:
    """--stream, or automatically for a local checkpoint too large to load comfortably."""
    if args.stream:
        return True
    if args.remove_params is not None:
        return False  # the budget's KL needs the model in memory (refused with --stream)
    path = resolve_model_path(args.model)
    if not (Path(path) / "config.json").is_file():
        return False  # a hub id: transformers downloads it; streaming needs local files
    large, size, available = should_stream(path)
    if not large:
        return False
    if _layerwise_possible(args, scorer):
        print(
            f"model {args.model}: safetensors {size / 1e9:.1f} GB > half of available RAM "
            f"({available / 1e9:.1f} GB); switching to --layerwise (one decoder layer in memory)"
        )
        args.layerwise = True
        return False
    if not scorer.weights_only or args.refit not in (None, "none"):
        needs = f"scorer {args.scorer}" if not scorer.weights_only else f"--refit {args.refit}"
        print(
            f"model {args.model}: safetensors {size / 1e9:.1f} GB > half of available RAM "
            f"({available / 1e9:.1f} GB), but {needs} needs the model in memory; "
            "loading it anyway"
        )
        return False
    print(
        f"model {args.model}: safetensors {size / 1e9:.1f} GB > half of available RAM "
        f"({available / 1e9:.1f} GB); switching to --stream (layer by layer, bounded memory)"
    )
    return True


def _layerwise_possible(args: argparse.Namespace, scorer: Scorer) -> bool:
    """Whether --layerwise could run these options (`check_layerwise` is the one rule)."""
    try:
        check_layerwise(args, scorer)
    except PruneNetError:
        return False
    return True


def _run_stream(args: argparse.Namespace, scorer: Scorer, folders: list[Path], device) -> int:
    """Stream-prune each ratio in turn (scorers may depend on the ratio, so each run scores)."""
    path = resolve_model_path(args.model)
    require_weights_only(scorer)
    if args.allocation == "auto":
        raise PruneNetError(
            "--allocation auto measures the model's own outputs and needs the model in "
            "memory; drop --stream, or use --allocation uniform with --stream."
        )
    # Refuse a ratio that would empty the FFN now, before any folder is written.
    for ratio in args.ratio:
        warn_if_nothing_removed(ffn_width(load_config(Path(path))), ratio)
    print(
        f"model {args.model}: streaming safetensors layer by layer; scoring with {scorer.name} "
        f"(seed {args.seed}) on {device}",
        flush=True,
    )
    rows = []
    for ratio, folder in zip(args.ratio, folders, strict=True):
        report = stream_prune(
            path,
            folder,
            scorer,
            ratio,
            device=device,
            overwrite=args.overwrite,
            progress=lambda line: print(f"  {line}", flush=True),
        )
        rows.append(summary_row(ratio, report, folder))
    print(format_table(SUMMARY_HEADERS, rows))
    return 0


def _widths(widths: list[int]) -> str:
    return str(widths[0]) if len(set(widths)) == 1 else f"{min(widths)}-{max(widths)}"
