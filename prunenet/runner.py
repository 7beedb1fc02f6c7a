"""Run one `PruneRequest`: the model's own text -> a plan -> the cut and refit -> saved folders.

`prune(model, out, request)` is the library's entry point and the CLI's only call
(`prunenet prune` builds the request from its flags). It checks the request, picks the memory
route (the whole model in memory, weights streamed layer by layer, or the default path one
decoder layer at a time), resolves the route's defaults, and runs the matching loop of
`prunenet.pipeline`, `prunenet.layerwise` or `prunenet.stream`. Every folder it writes carries
the resolved request (`prunenet_request.json`) and a model card (`README.md`).

Why this module is long (over 400 lines): the three routes share the checks that must run
before any model is read and the record every folder carries; apart, each would repeat them.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from prunenet.allocation.speedup import check_target_speedup, ratio_for_speedup
from prunenet.allocation.strategy import strategy_context
from prunenet.allocation.structures import check_budget, ffn_split, parse_structures
from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.analysis.sequential import analysis_text
from prunenet.analysis.shared import SHARED_HINT_REQUESTS
from prunenet.core.arch import can_store_output_bias
from prunenet.core.compress import PruneReport, estimated_output_bytes
from prunenet.core.config_fields import ffn_width
from prunenet.core.devices import resolve_device
from prunenet.core.memory import return_large_blocks
from prunenet.core.ratios import keep_count
from prunenet.errors import PruneNetError
from prunenet.evaluation.vocabulary import embedding_rows, warn_if_tokenizer_overflows
from prunenet.io.models import (
    ALIASES,
    empty_model,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model_path,
)
from prunenet.io.output_checks import check_free_space
from prunenet.io.resume import SKIPPED, finished_line, folders_to_write
from prunenet.io.saving import hold_output
from prunenet.io.stream.checkpoint import checkpoint_bytes, load_config
from prunenet.layerwise import layerwise_prune
from prunenet.pipeline import (
    check_analysis,
    prune_and_save,
    prune_budgets_and_save,
    prune_strategies_and_save,
    scorer_planner,
    text_needed,
)
from prunenet.request import PruneRequest, request_record, threads_to_use
from prunenet.rl.strategy import BUNDLED_STRATEGY, load_strategy_policy, make_strategy
from prunenet.scoring.base import Scorer
from prunenet.scoring.registry import make_scorer
from prunenet.stages import StageTimes
from prunenet.stream import require_weights_only, should_stream, stream_prune

Say = Callable[[str], None]


@dataclass
class PruneResult:
    """One output folder of a request.

    :param amount: its share of FFN rows (`ratio`) or of parameters (`remove_params`).
    :param folder: where it was saved.
    :param report: what the cut did (`prunenet_report.json`).
    :param strategy: the per-layer strategy, for `ramp`, `policy` and `search`.
    """

    amount: float
    folder: Path
    report: PruneReport
    strategy: object | None = None


def prune(
    model: str,
    out: str | Path,
    request: PruneRequest | None = None,
    *,
    overwrite: bool = False,
    command: str | None = None,
    say: Say | None = None,
    **options,
) -> list[PruneResult]:
    """Prune `model` as `request` asks and save one folder per amount under `out`.

    :param model: a local model folder, a hub id, or a built-in alias (`smollm2-135m`, ...).
    :param out: the output folder (one amount), or the parent of `ratio-0.30`-style subfolders
        (several amounts; resumable: subfolders already complete for this request are skipped,
        `prunenet.io.resume`).
    :param request: what to prune and how (`PruneRequest()`: the defaults).
    :param overwrite: replace an existing output folder that PruneNet wrote.
    :param command: the command line, recorded in the folder (the CLI passes its own).
    :param say: receives one-line progress messages (None: silent; the CLI prints them).
    :param options: request fields to change, e.g. `ratio=(0.3,)` (`PruneRequest.replace`).
    :return: one result per output folder, in the request's order.
    """
    request = (request or PruneRequest()).replace(**options).validate()
    say = say or (lambda line: None)
    if request.target_speedup is not None:
        check_target_speedup(request.target_speedup)
    request = request.replace(threads=threads_to_use(request.threads))  # recorded resolved
    torch.set_num_threads(request.threads)
    return_large_blocks()  # the cut's temporaries leave memory when freed (core/memory.py)
    folders = output_folders(out, request)
    device = resolve_device(request.device)
    scorer = build_scorer(request)  # a bad checkpoint fails here, before the model is read
    if request.analysis is not None:
        check_analysis(request.analysis, scorer)
    strategy_policy = None
    if request.strategy_name == "policy":
        strategy_policy = load_strategy_policy(request.strategy_checkpoint or BUNDLED_STRATEGY)[0]
    _hint_shared(request)
    several = [folder.name for folder in folders] if len(folders) > 1 else None
    with hold_output(out, overwrite, subfolders=several):
        # Own `out` for the whole run: a second run to it exits 2 now, not after its scoring.
        route = choose_route(model, request, scorer, say)
        request = resolve_defaults(request, scorer, route)
        run = Run(model, request, scorer, folders, overwrite, device, say, command)
        if several is None:
            results = run.along(route, strategy_policy)
        else:
            results = run.resumed(route, strategy_policy)
    if request.remove_params is not None:
        warn_if_budget_removed_nothing(results)
    return results


def output_folders(out: str | Path, request: PruneRequest) -> list[Path]:
    """One folder for one amount; `out/ratio-0.30` (`params-0.20`) subfolders for several.

    :param out: the output folder the user gave.
    :param request: the request (its amounts).
    """
    prefix = "params" if request.remove_params is not None else "ratio"
    amounts = request.amounts
    if len(amounts) == 1:
        return [Path(out)]
    return [Path(out) / folder_name(amount, prefix) for amount in amounts]


def folder_name(amount: float, prefix: str = "ratio") -> str:
    """`ratio-0.30`: two decimals where they are exact, every digit otherwise (so that finer
    amounts stay distinct).

    :param amount: the share removed.
    :param prefix: `ratio` or `params`.
    """
    return f"{prefix}-{amount:.2f}" if float(f"{amount:.2f}") == amount else f"{prefix}-{amount!r}"


def build_scorer(request: PruneRequest) -> Scorer:
    """The row scorer the request names, or the one its checkpoint holds.

    :param request: the request (`scorer`, `seed`, `device`).
    """
    if request.scorer_checkpoint is not None:
        from prunenet.scoring.registry import load_scorer_from_checkpoint

        return load_scorer_from_checkpoint(request.scorer_checkpoint, device=request.device)
    return make_scorer(request.scorer, seed=request.seed)


def choose_route(model: str, request: PruneRequest, scorer: Scorer, say: Say) -> str:
    """`memory`, `stream` or `layerwise`: the request's route, or for `auto` the memory route
    unless the local checkpoint is larger than half of the available RAM.

    :param model: the model the request runs on.
    :param request: the validated request.
    :param scorer: its scorer (whether it reads activations).
    :param say: progress messages.
    """
    if request.route == "stream":
        require_weights_only(scorer)
        return "stream"
    if request.route == "layerwise":
        _check_layerwise_scorer(scorer)
        return "layerwise"
    if request.route == "memory":
        return "memory"
    path = resolve_model_path(model)
    if not (Path(path) / "config.json").is_file():
        return "memory"  # a hub id: transformers downloads it; the other routes read files
    large, size, available = should_stream(path)
    if not large:
        return "memory"
    sizes = f"safetensors {size / 1e9:.1f} GB > half of available RAM ({available / 1e9:.1f} GB)"
    layerwise = request.replace(route="layerwise")
    if _would_validate(layerwise) and not scorer.weights_only:
        say(f"model {model}: {sizes}; switching to --route layerwise (one decoder layer in "
            "memory)")  # fmt: skip
        return "layerwise"
    stream = request.replace(route="stream")
    if scorer.weights_only and _would_validate(stream) and request.target_speedup is None:
        say(f"model {model}: {sizes}; switching to --route stream (weights only, layer by "
            "layer)")  # fmt: skip
        return "stream"
    say(f"model {model}: {sizes}, but this request needs the model in memory; loading it anyway")
    return "memory"


def resolve_defaults(request: PruneRequest, scorer: Scorer, route: str) -> PruneRequest:
    """The request with the route's defaults filled in: sequential analysis for scorers that
    read activations (oneshot for weights-only ones and when streaming), the lsq refit (none
    when streaming). Explicit choices are kept.

    :param request: the validated request.
    :param scorer: its scorer.
    :param route: where it runs (`choose_route`).
    """
    streamed = route == "stream"
    analysis = request.analysis or ("oneshot" if scorer.weights_only or streamed else "sequential")
    refit = request.refit or ("none" if streamed else "lsq")
    return request.replace(route=route, analysis=analysis, refit=refit)


class Run:
    """One request on one model along one route (`prune` builds it).

    :param model: the model spec.
    :param request: the request, defaults resolved.
    :param scorer: its row scorer.
    :param folders: one output folder per amount.
    :param overwrite: replace existing folders PruneNet wrote.
    :param device: where the in-memory route runs.
    :param say: progress messages.
    :param command: the command line, for the record.
    """

    def __init__(self, model, request, scorer, folders, overwrite, device, say, command) -> None:
        self.model, self.request, self.scorer = model, request, scorer
        self.folders, self.overwrite, self.device = folders, overwrite, device
        self.say, self.command = say, command
        self.selfgen = SelfGenConfig(
            sequences=request.text_sequences, length=request.text_length, seed=request.seed
        )

    def record(self, amount: float) -> dict:
        """What the folder of one amount records about its making (`prunenet_request.json`,
        the card): the request as it would replay that folder alone.

        :param amount: the folder's share of FFN rows or of parameters.
        """
        field = "remove_params" if self.request.remove_params is not None else "ratio"
        request = self.request.replace(**{field: (amount,)})
        record = request_record(request, self.model, self.command)
        record.update(source_metadata(self.model))
        return record

    def records(self, amounts) -> list[dict]:
        """`record` for each amount, in order."""
        return [self.record(amount) for amount in amounts]

    def along(self, route: str, strategy_policy) -> list[PruneResult]:
        """Run along `route` (`choose_route`)."""
        if route == "stream":
            return self.stream()
        if route == "layerwise":
            return self.layerwise()
        return self.in_memory(strategy_policy)

    def resumed(self, route: str, strategy_policy) -> list[PruneResult]:
        """Several folders, resumably (`prunenet.io.resume`): skip those already complete for
        this request, write the others; if interrupted, say which are finished.

        :return: results for the folders this run wrote.
        """
        folders, records = self.folders, self.records(self.request.amounts)
        todo = folders_to_write(folders, records, self.overwrite)  # refusals before any work
        for index, folder in enumerate(folders):
            if index not in todo:
                self.say(f"{folder}: {SKIPPED}")
        if not todo:
            return []
        field = "remove_params" if self.request.remove_params is not None else "ratio"
        amounts = tuple(self.request.amounts[index] for index in todo)
        self.request = self.request.replace(**{field: amounts})
        self.folders = [folders[index] for index in todo]
        try:
            return self.along(route, strategy_policy)
        except KeyboardInterrupt:
            # Each folder is complete or absent; say which, since a rerun then resumes.
            print(f"prunenet prune: {finished_line(folders, records)}", file=sys.stderr)
            raise

    # ----- the whole model in memory ----------------------------------------------------------

    def in_memory(self, strategy_policy) -> list[PruneResult]:
        request = self.request
        # Wall seconds (and peak memory) per stage, into every folder's report
        # (`prunenet.stages`).
        stages = StageTimes()
        with stages.timing("load"):
            model, tokenizer = load_model(self.model, dtype=request.dtype, device=str(self.device))
        warn_if_tokenizer_overflows(tokenizer, embedding_rows(model), self.model)
        # Everything that can be refused is refused now, before the (slow) scoring.
        width = ffn_width(model.config)
        search = None
        if request.remove_params is not None:
            parse_structures(",".join(request.structures), model.config)  # heads it can lose
            for target in request.remove_params:
                check_budget(model, target, request.structures)
            dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            sizes = [int((1 - target) * dense_bytes) for target in request.remove_params]
        else:
            if request.target_speedup is not None:
                with stages.timing("speedup_search"):
                    search = ratio_for_speedup(model, request.target_speedup)
                request = self.request = request.replace(ratio=(search.ratio,))
                self.say(
                    f"target prefill speed-up {request.target_speedup}: ratio {search.ratio} "
                    f"timed at {search.speedup:.2f}x ({len(search.trials)} trials, "
                    f"{search.prefill_tokens} tokens, batch 1, {search.threads} thread(s), "
                    f"paired median of {search.rounds})"
                )
            for ratio in request.ratio:
                warn_if_nothing_removed(width, ratio)
            sizes = [estimated_output_bytes(model, ratio) for ratio in request.ratio]
        check_free_space(self.folders[0], sum(sizes))
        if request.refit == "bias" and not can_store_output_bias(model.config):
            raise PruneNetError(
                f"--refit bias adds an FFN output bias, which {model.config.model_type} models "
                "cannot store (plain from_pretrained would drop it); use --refit lsq, which "
                "refits them without an intercept, or --refit none."
            )
        self.say(
            f"model {self.model} ({model.config.model_type}) loaded in "
            f"{stages.seconds['load']:.1f} s; "
            f"scoring with {self.scorer.name} (seed {request.seed}, {self.device}), "
            f"{_how_much(request)}, {request.analysis} analysis, refit {request.refit}"
        )
        allocation = "auto" if request.strategy == "auto" else "uniform"
        tokens = None
        if allocation == "auto" and text_needed(request.analysis, request.refit):
            # The cut reads the run's text; the layer sensitivity reads it too, so it is
            # written first (one text per run).
            with stages.own_text():
                tokens = analysis_text(model, self.selfgen)
        planner = scorer_planner(self.scorer, allocation, request.max_layer_ratio,
                                 request.analysis, tokens)  # fmt: skip
        if search is not None:
            planner = _recording(planner, {"target_speedup": search.to_dict()})
        common = dict(overwrite=self.overwrite, refit=request.refit, selfgen=self.selfgen,
                      records=self.records(request.amounts), stages=stages)  # fmt: skip
        if request.remove_params is not None and request.strategy_name != "uniform":
            with stages.own_text():
                tokens = analysis_text(model, self.selfgen)
            with stages.timing("strategy"):
                context = strategy_context(
                    model, tokens, request.refit != "none", request.strategy_name == "policy"
                )
                strategies = [
                    make_strategy(request.strategy_name, context, target, request.structures,
                                  strategy_policy, request.search_evaluations, request.seed)
                    for target in request.remove_params
                ]  # fmt: skip
            reports = prune_strategies_and_save(
                model, tokenizer, planner, strategies, context.head_rank, self.folders,
                tokens=tokens, **common,
            )  # fmt: skip
            return [
                PruneResult(target, folder, report, strategy)
                for target, folder, report, strategy in zip(
                    request.remove_params, self.folders, reports, strategies, strict=True
                )
            ]
        if request.remove_params is not None:
            reports = prune_budgets_and_save(
                model, tokenizer, planner, request.remove_params, request.structures,
                self.folders, **common,
            )  # fmt: skip
            return _results(request.remove_params, self.folders, reports)
        reports = prune_and_save(model, tokenizer, planner, request.ratio, self.folders,
                                 tokens=tokens, **common)  # fmt: skip
        return _results(request.ratio, self.folders, reports)

    def ratios_of(self, config) -> tuple[list[float], list[dict | None]]:
        """The FFN ratio of each amount on the routes that never hold the whole model, and the
        split each parameter budget becomes (None for a ratio). A budget there takes FFN rows
        alone (`validate` refuses other structures), so it is arithmetic on the parameter
        counts of an empty skeleton of the model: the rows `--route memory` would take."""
        request = self.request
        if request.remove_params is None:
            return list(request.ratio), [None] * len(request.ratio)
        skeleton = empty_model(config)
        refit_biases = request.refit not in (None, "none")
        splits = [ffn_split(skeleton, target, refit_biases) for target in request.remove_params]
        return [split.ffn_ratio(config) for split in splits], [split.to_dict() for split in splits]

    # ----- one decoder layer at a time --------------------------------------------------------

    def layerwise(self) -> list[PruneResult]:
        request = self.request
        path = Path(resolve_model_path(self.model))
        if not (path / "config.json").is_file():
            raise PruneNetError(
                f"--route layerwise reads a local safetensors folder; {self.model!r} is not one. "
                "Download it first (or save it with save_pretrained)."
            )
        config = load_config(path)
        ratios, splits = self.ratios_of(config)
        for ratio in ratios:
            warn_if_nothing_removed(ffn_width(config), ratio)
        check_free_space(self.folders[0], checkpoint_bytes(path) * len(ratios))
        dtype = resolve_dtype(str(path), request.dtype)
        compute_dtype = resolve_dtype(str(path), request.compute_dtype or request.dtype)
        tokenizer = load_tokenizer(str(path))
        warn_if_tokenizer_overflows(tokenizer, config.get_text_config().vocab_size, self.model)
        self.say(
            f"model {self.model} ({config.model_type}): layer by layer from its safetensors "
            f"({dtype}, computed in {compute_dtype}); scoring with {self.scorer.name} (seed "
            f"{request.seed}, cpu), uniform allocation, {request.analysis} analysis, refit "
            f"{request.refit}"
        )
        planner = scorer_planner(self.scorer, "uniform", analysis=request.analysis)
        reports = [
            layerwise_prune(
                path,
                folder,
                planner,
                ratio,
                refit=request.refit,
                selfgen=self.selfgen,
                dtype=dtype,
                compute_dtype=compute_dtype,
                tokenizer=tokenizer,
                overwrite=self.overwrite,
                text_route=request.text_route,
                record=self.record(amount),
                structures=split,
            )  # fmt: skip
            for ratio, split, amount, folder in zip(
                ratios, splits, request.amounts, self.folders, strict=True
            )
        ]
        return _results(request.amounts, self.folders, reports)

    # ----- weights only, streamed -------------------------------------------------------------

    def stream(self) -> list[PruneResult]:
        request = self.request
        path = resolve_model_path(self.model)
        if request.strategy == "auto":
            raise PruneNetError(
                "--strategy auto measures the model's own outputs and needs the model in memory; "
                "use --route memory, or --strategy uniform with --route stream."
            )
        config = load_config(Path(path))
        ratios, splits = self.ratios_of(config)
        for ratio in ratios:  # refuse a ratio that empties the FFN before any write
            warn_if_nothing_removed(ffn_width(config), ratio)
        self.say(
            f"model {self.model}: streaming safetensors layer by layer; scoring with "
            f"{self.scorer.name} (seed {request.seed}) on {self.device}"
        )
        reports = [
            stream_prune(
                path,
                folder,
                self.scorer,
                ratio,
                device=self.device,
                overwrite=self.overwrite,
                progress=lambda line: self.say(f"  {line}"),
                record=self.record(amount),
                structures=split,
            )  # fmt: skip
            for ratio, split, amount, folder in zip(
                ratios, splits, request.amounts, self.folders, strict=True
            )
        ]
        return _results(request.amounts, self.folders, reports)


def source_metadata(model: str) -> dict:
    """What a model card says about the source: its hub id (`base_model`) and license, where
    PruneNet knows them (a built-in alias, or a hub id), else nothing.

    :param model: the model spec the request ran on.
    """
    if model in ALIASES:
        alias = ALIASES[model]
        return {"base_model": alias.hub_id, "license": alias.license}
    if not Path(model).expanduser().exists() and model.count("/") == 1:
        return {"base_model": model, "license": None}
    return {"base_model": None, "license": None}


def command_line(argv: list[str]) -> str:
    """The command as a user would type it again (for the record).

    :param argv: the arguments after the program name.
    """
    return shlex.join(["prunenet", *argv])


def warn_if_nothing_removed(width: int, ratio: float) -> int:
    """Rows kept at `ratio` (refusing a ratio that empties the FFN); warn when none go.

    :param width: the FFN width.
    :param ratio: the share of rows to remove.
    """
    kept = keep_count(width, ratio)
    if kept == width:
        print(
            f"prunenet prune: warning: ratio {ratio} removes no row of a {width}-row FFN "
            f"(round({1 - ratio:g} x {width}) = {width}), so the output is a full-size copy; "
            f"a ratio of at least {1 / width:.2g} removes one row per layer.",
            file=sys.stderr,
        )
    return kept


def warn_if_budget_removed_nothing(results: list[PruneResult]) -> None:
    """A parameter budget too small to remove one row, head or layer writes a full-size copy:
    say so (as `warn_if_nothing_removed` does for a ratio).

    :param results: the run's results.
    """
    for result in results:
        if result.report.params_after >= result.report.params_before:
            print(
                f"prunenet prune: warning: --remove-params {result.amount} removes nothing from "
                f"this model (not one FFN row, head or layer), so {result.folder} is a full-size "
                "copy; ask for a larger share.",
                file=sys.stderr,
            )


def _results(amounts, folders, reports) -> list[PruneResult]:
    return [
        PruneResult(amount, folder, report)
        for amount, folder, report in zip(amounts, folders, reports, strict=True)
    ]


def _hint_shared(request: PruneRequest) -> None:
    """Point many budgets at `analysis shared`: a hint, not a switch (it is a speed trade
    that costs code perplexity at every measured budget, and a default must not lose)."""
    budgets = request.remove_params or ()
    plain = request.structures == ("ffn",) and request.strategy == "uniform"
    if request.analysis is None and len(budgets) >= SHARED_HINT_REQUESTS and plain:
        print(
            f"prunenet prune: {len(budgets)} requests, each cut on its own (sequential "
            'analysis, about one prune\'s time each); --analysis shared ("analysis": '
            '"shared" in --config) answers all of them in about the time of one, at 1.6-5.6% '
            "higher code perplexity on SmolLM2 "
            "(docs/strategies.md, 'Many requests at once')",
            file=sys.stderr,
            flush=True,
        )


def _check_layerwise_scorer(scorer: Scorer) -> None:
    if scorer.weights_only:
        raise PruneNetError(
            "--route layerwise exists to run the activation-based default path; this scorer "
            "reads weights only: use --route stream for it."
        )


def _would_validate(request: PruneRequest) -> bool:
    try:
        request.validate()
    except PruneNetError:
        return False
    return True


def _how_much(request: PruneRequest) -> str:
    if request.remove_params is not None and request.strategy_name != "uniform":
        return f"{request.strategy_name} strategy per layer"
    return f"{'auto' if request.strategy == 'auto' else 'uniform'} allocation"


def _recording(planner, info: dict):
    """`planner` whose plans also record `info` (it goes into prunenet_report.json)."""

    def plan(model, ratio):
        result = planner(model, ratio)
        result.info.update(info)
        return result

    return plan
