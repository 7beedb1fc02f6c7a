"""The pruning loop, in one place: score -> how much per layer -> cut -> save.

`prunenet prune` and `scripts/benchmark_quality.py` both go through here, so the benchmark
measures exactly what the command ships. The stages it strings together:

1. a `Planner` decides, for a model and a target ratio, each layer's row scores and how many
   rows each layer keeps (`PrunePlan`); `scorer_planner` is the standard one: a scorer's
   ranking (computed once and reused for every ratio, unless the scorer observes the ratio, as
   a policy does) with a uniform or self-generated ("auto") per-layer allocation;
2. `apply_plan` cuts a model (or a copy) to that plan (`prunenet.core.compress.prune_model`);
3. `prune_and_save` does both for a list of ratios and saves each result atomically;
   `prune_budgets_and_save` does the same for parameter budgets split between FFN rows, heads
   and layers (`prunenet.allocation.structures`): heads and layers are cut first, then the FFN
   rows through the same plan and cut; `apply_strategy` does the same for a per-layer
   strategy (`prunenet.allocation.strategy`: per-layer FFN rows, heads and dropped layers);
4. with `analysis="shared"` (`prunenet.analysis.shared`) the dense model is analysed once for
   all ratios or budgets, and each one is a selection and a ridge solve per layer
   (`apply_shared`), instead of a layer-by-layer walk per request.

Why this module is long (over 400 lines): the three ways of saying how much to cut (ratios,
parameter budgets split uniformly, per-layer strategies) share one cut and one save here, so
that the CLI and the benchmarks cannot drift apart.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunenet.allocation.budget import DEFAULT_MAX_RATIO, keep_counts
from prunenet.allocation.sensitivity import ALLOCATIONS, auto_allocation
from prunenet.allocation.strategy import Strategy
from prunenet.allocation.structures import StructureSplit, split_budget
from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.analysis.sequential import (
    ANALYSIS_SELFGEN,
    LayerScore,
    SequentialCut,
    analysis_text,
)
from prunenet.analysis.shared import SharedAnalysis, SharedCut, shared_analysis
from prunenet.core.compress import PruneReport, count_parameters, prune_model
from prunenet.core.config_fields import ffn_widths, head_shapes
from prunenet.core.depth import drop_layers
from prunenet.core.heads import prune_heads, select_heads
from prunenet.core.memory import page_out_replaced, tensor_ranges
from prunenet.core.ratios import uniform_keep
from prunenet.core.refit import check_refit
from prunenet.errors import PruneNetError
from prunenet.io.saving import save_pruned
from prunenet.scoring.base import Scorer
from prunenet.stages import StageTimes, rewrite_report

# The analyses whose plans score each layer on the activations the layer-by-layer cut sees
# (`PrunePlan.layer_score`), so they read the model's own text.
ACTIVATION_ANALYSES = ("sequential", "shared")


@dataclass
class PrunePlan:
    """What to cut at one ratio: scores and kept rows per layer, and how they were decided.

    :param scores: one importance vector per decoder layer (higher = keep); None when
        `layer_score` scores each layer as it is cut.
    :param layer_keep: rows kept per layer.
    :param info: what to record about the method (scorer, allocation, ...).
    :param layer_score: sequential analysis: scores each layer on the activations it sees once
        the layers before it are cut (`prunenet.analysis.sequential.SequentialCut`).
    """

    scores: list[torch.Tensor] | None
    layer_keep: list[int]
    info: dict = field(default_factory=dict)
    layer_score: LayerScore | None = None


ANALYSES = ("oneshot", "sequential", "shared")

# (dense model, target ratio) -> plan. A planner must not modify the model.
Planner = Callable[[nn.Module, float], PrunePlan]


def scorer_planner(
    scorer: Scorer,
    allocation: str = "uniform",
    max_layer_ratio: float = DEFAULT_MAX_RATIO,
    analysis: str = "oneshot",
    tokens: torch.Tensor | None = None,
) -> Planner:
    """The standard planner: `scorer`'s ranking with a uniform or an automatic allocation.

    One-shot scores are computed on the first call and reused for later ratios, because for a
    ratio-blind scorer one ranking serves every ratio (and scoring is the slow part); a
    ratio-aware scorer (`Scorer.ratio_aware`, e.g. a policy that observes the ratio) is asked
    again at every ratio. Sequential scores are computed while the model is cut.

    :param scorer: ranks each layer's rows.
    :param allocation: `uniform` (the same ratio in every layer) or `auto` (the same total,
        spread by self-generated layer sensitivity; `prunenet.allocation.sensitivity`).
    :param max_layer_ratio: the most `auto` removes from one layer.
    :param analysis: `oneshot` (every layer scored on the dense model's activations),
        `sequential` (each layer scored on the activations of the model whose earlier layers
        are already cut; needs an activation-based scorer) or `shared` (scored on the dense
        model's activations on the analysis text, `prunenet.analysis.shared`; cut with
        `apply_shared`).
    :param tokens: the run's own text, which `auto` measures layer sensitivity on (None: `auto`
        has the model write a small text of its own).
    """
    if allocation not in ALLOCATIONS:
        raise PruneNetError(
            f"Unknown allocation {allocation!r}; choose {' or '.join(ALLOCATIONS)}."
        )
    check_analysis(analysis, scorer)
    cached: list[list[torch.Tensor]] = []

    def plan(model: nn.Module, ratio: float) -> PrunePlan:
        widths = ffn_widths(model.config)
        if allocation == "auto":
            removed = auto_allocation(model, scorer, ratio, max_layer_ratio, tokens)
            layer_keep = keep_counts(widths, removed)
        else:
            layer_keep = uniform_keep(widths, ratio)
        info = {**scorer.describe(), "allocation": allocation, "analysis": analysis}
        if analysis in ACTIVATION_ANALYSES:
            score = functools.partial(_score_activations, scorer, ratio)
            return PrunePlan(None, layer_keep, info, layer_score=score)
        if scorer.ratio_aware or not cached:
            cached[:] = [scorer.score_model(model, ratio=ratio)]
        return PrunePlan(cached[0], layer_keep, info)

    return plan


def _score_activations(scorer: Scorer, ratio: float, ffn, stats, index: int, count: int):
    return scorer.score_activations(ffn, stats, index, count, ratio)


def check_analysis(analysis: str, scorer: Scorer) -> str:
    """`analysis` if it names one (`ANALYSES`) that `scorer` can do, else a clear error."""
    if analysis not in ANALYSES:
        raise PruneNetError(f"Unknown analysis {analysis!r}; choose one of {', '.join(ANALYSES)}.")
    if analysis == "sequential" and scorer.weights_only:
        raise PruneNetError(
            f"Scorer {scorer.name!r} reads only weights, so sequential analysis would pick the "
            "same rows as one-shot; use --analysis oneshot (a refit is sequential either way), "
            "or an activation-based scorer (policy, selfgen)."
        )
    return analysis


def needs_text(plan: PrunePlan, refit: str) -> bool:
    """Whether cutting to `plan` with `refit` walks the model layer by layer on its own text."""
    return plan.layer_score is not None or check_refit(refit) != "none"


def text_needed(analysis: str, refit: str) -> bool:
    """`needs_text` before any plan exists: whether a `scorer_planner(..., analysis)` plan cut
    with `refit` reads the model's own text (the runner writes it first when something else
    reads it too).

    :param analysis: `oneshot`, `sequential` or `shared`.
    :param refit: `none`, `bias` or `lsq`.
    """
    return analysis in ACTIVATION_ANALYSES or check_refit(refit) != "none"


def apply_plan(
    model: nn.Module,
    plan: PrunePlan,
    ratio: float,
    in_place: bool = False,
    refit: str = "none",
    selfgen: SelfGenConfig = ANALYSIS_SELFGEN,
    tokens: torch.Tensor | None = None,
    select: str = "top",
) -> tuple[nn.Module, PruneReport]:
    """Cut `model` (or a deep copy, leaving `model` dense) to `plan`, refitting if asked.

    :param model: the dense model.
    :param plan: from a `Planner` at `ratio`.
    :param ratio: the target ratio (recorded in the report).
    :param in_place: prune `model` itself instead of a copy (saves memory for the last ratio).
    :param refit: `none` (the plain cut), `bias` or `lsq`: repair each layer's output
        projection on self-generated activations, layer by layer (`prunenet.analysis.
        sequential`); the report records the ridge and held-out errors per layer.
    :param selfgen: the self-generated text sequential scoring and the refit use (a quarter
        held out).
    :param tokens: that text, generated by the dense model beforehand (`analysis_text`); None
        generates it here (when the plan or the refit needs it).
    :return: the pruned model and what was done to it.
    """
    if plan.info.get("analysis") == "shared":
        raise PruneNetError("A shared-analysis plan is cut by apply_shared, not apply_plan.")
    cut = None
    layer_by_layer = needs_text(plan, refit)
    if layer_by_layer and tokens is None:
        tokens = analysis_text(model, selfgen)
    pruned = model if in_place else copy.deepcopy(model)
    params_before = count_parameters(pruned)
    if layer_by_layer:
        # (It may give every FFN projection a zero bias first: not the dense model's size.)
        cut = SequentialCut(pruned, refit, tokens, plan.layer_score, select=select)
    report = prune_model(pruned, plan.scores, plan.layer_keep, target_ratio=ratio, cut=cut)
    report.params_before = params_before
    report.scorer = dict(plan.info)
    if cut is not None:
        report.scorer["sequential"] = cut.log.to_dict()
    return pruned, report


def apply_shared(
    model: nn.Module,
    plan: PrunePlan,
    ratio: float,
    analysis: SharedAnalysis,
    in_place: bool = False,
) -> tuple[nn.Module, PruneReport]:
    """Cut `model` (or a deep copy) to `plan` from the dense model's shared analysis: each layer
    scored on the stored statistics and refitted on the stored moments (`analysis.refit`).

    :param model: the dense model `analysis` was made on.
    :param plan: from a planner with `analysis="shared"` at `ratio`.
    :param ratio: the target ratio (recorded in the report).
    :param analysis: `prunenet.analysis.shared.shared_analysis(model, tokens, refit)`.
    :param in_place: prune `model` itself (the last request: saves a copy).
    :return: the pruned model and what was done to it.
    """
    pruned = model if in_place else copy.deepcopy(model)
    params_before = count_parameters(pruned)
    # (It may give every FFN projection a zero bias first: not the dense model's size.)
    cut = SharedCut(pruned, analysis, plan.layer_score)
    report = prune_model(pruned, plan.scores, plan.layer_keep, target_ratio=ratio, cut=cut)
    report.params_before = params_before
    report.scorer = {**plan.info, "shared": {**analysis.to_dict(), "layers": cut.log}}
    return pruned, report


def prune_and_save(
    model: nn.Module,
    tokenizer,
    planner: Planner,
    ratios: Sequence[float],
    folders: Sequence[str | Path],
    overwrite: bool = False,
    refit: str = "none",
    selfgen: SelfGenConfig = ANALYSIS_SELFGEN,
    records: Sequence[dict] | None = None,
    stages: StageTimes | None = None,
    tokens: torch.Tensor | None = None,
) -> list[PruneReport]:
    """Prune at each ratio and save each result atomically into its folder.

    :param model: the dense model; pruned in place at the last ratio (the others use copies).
    :param tokenizer: saved beside each model (None: the folders get none).
    :param planner: decides each ratio's cut.
    :param ratios: target ratios, one folder each.
    :param folders: output folders, as many as `ratios`.
    :param overwrite: replace existing folders.
    :param refit: `none`, `bias` or `lsq` (`apply_plan`).
    :param selfgen: the self-generated text sequential scoring and the refit use.
    :param records: how each folder was made (`prunenet.runner`), one per folder, or None.
    :param stages: the run's stages so far (`prunenet.runner` times the load); each report gets
        them with the text, its cut and its save (`prunenet.stages`).
    :param tokens: the run's own text when the caller wrote it already (for `planner`, as the
        runner does for `--strategy auto`); None: written here when the cut needs it.
    :return: one report per ratio, with `seconds` covering planning, cutting and saving (the
        first ratio's include writing the text).
    """
    check_refit(refit)
    if len(ratios) != len(folders):
        raise PruneNetError(f"Got {len(ratios)} ratios for {len(folders)} output folders.")
    # The dense model writes its text once; every ratio uses the same text.
    analysis = None  # with a shared plan, the dense model is analysed once for every ratio
    run = stages or StageTimes()
    reports = []
    for index, (ratio, folder) in enumerate(zip(ratios, folders, strict=True)):
        start = time.perf_counter()
        plan = planner(model, ratio)
        planning = time.perf_counter() - start
        if tokens is None and needs_text(plan, refit):
            with run.own_text():
                tokens = analysis_text(model, selfgen)
        times = run.fork()
        times.seconds["cut"] = planning
        last = index == len(ratios) - 1
        with times.timing("cut"):
            if plan.info.get("analysis") == "shared":
                analysis = analysis or shared_analysis(model, tokens, refit)
                pruned, report = apply_shared(model, plan, ratio, analysis, last)
            else:
                pruned, report = apply_plan(model, plan, ratio, last, refit, selfgen, tokens)
        record = records[index] if records else None
        _save_timed(pruned, tokenizer, folder, report, overwrite, record, times, start)
        reports.append(report)
    return reports


def _save_timed(pruned, tokenizer, folder, report, overwrite, record, times, start) -> None:
    """`save_pruned`, timed; then the saved report gets the save's seconds and the total
    (`seconds`, from `start`), which only exist once the save is done."""
    report.stages = times.to_dict()
    with times.timing("save"):
        save_pruned(pruned, tokenizer, folder, report, overwrite, record)
    report.seconds = time.perf_counter() - start
    report.stages = times.to_dict()
    rewrite_report(folder, report)


def cut_structures(model: nn.Module, split: StructureSplit) -> None:
    """Cut `split`'s heads and layers from `model` in place (its FFN rows are left to a plan).

    Heads go first, chosen by the scores the split was measured with, in every layer (dense
    indices); then the layers are dropped.

    :param model: the dense model `split` was computed on.
    :param split: from `prunenet.allocation.structures.split_budget`.
    """
    before = tensor_ranges(model)
    if split.query_heads or split.kv_groups:
        keep = [
            select_heads(scores, shape, shape.num_kv_heads - split.kv_groups,
                         shape.group_size - split.query_heads)
            for scores, shape in zip(split.head_scores, head_shapes(model.config), strict=True)
        ]  # fmt: skip
        prune_heads(model, keep)
    if split.layers:
        drop_layers(model, split.layers)
    page_out_replaced(before, model)  # the cut heads' and dropped layers' weights


def apply_budget(
    model: nn.Module,
    planner: Planner,
    target: float,
    structures: Sequence[str],
    tokens: torch.Tensor,
    in_place: bool = False,
    refit: str = "none",
    shared: Callable[[], SharedAnalysis] | None = None,
) -> tuple[nn.Module, PruneReport]:
    """Remove `target` of all parameters from `model` (or a copy), split between `structures`.

    :param model: the dense model.
    :param planner: decides the FFN cut of the model once its heads and layers are gone.
    :param target: fraction of all parameters to remove.
    :param structures: a subset of `prunenet.allocation.structures.STRUCTURES`.
    :param tokens: the dense model's own text (`analysis_text`): the split's KL and scores, the
        sequential FFN analysis and the refit all use it.
    :param in_place: cut `model` itself.
    :param refit: the FFN refit (`apply_plan`).
    :param shared: for a planner with `analysis="shared"`: returns the dense model's
        `SharedAnalysis` (computed once for all budgets); FFN rows only.
    :return: the pruned model and its report (`structures` holds the split).
    """
    params_before = count_parameters(model)
    split = split_budget(model, target, structures, tokens, refit_biases=refit != "none")
    plan = None
    if split.ffn_rows and not (split.layers or split.query_heads or split.kv_groups):
        # FFN rows only: the model the plan is made for is the dense one.
        ratio = split.ffn_ratio(model.config)
        plan = planner(model, ratio)
        if plan.info.get("analysis") == "shared":
            if shared is None:
                raise PruneNetError("A shared-analysis planner needs `shared` (the analysis).")
            pruned, report = apply_shared(model, plan, ratio, shared(), in_place)
            report.structures = split.to_dict()
            return pruned, report
    pruned = model if in_place else copy.deepcopy(model)
    cut_structures(pruned, split)
    widths = ffn_widths(pruned.config)
    if split.ffn_rows:
        ratio = split.ffn_ratio(pruned.config)
        plan = plan or planner(pruned, ratio)
        if plan.info.get("analysis") == "shared":
            raise PruneNetError(
                "The shared analysis describes the dense model's FFNs; it cuts FFN rows only "
                "(--structures ffn), not heads or layers."
            )
        pruned, report = apply_plan(pruned, plan, ratio, True, refit, tokens=tokens)
    else:  # heads and layers only: the FFNs stay as they are, so nothing to score or refit
        report = PruneReport(pruned.config.model_type, len(widths), max(widths), widths,
                             params_before, count_parameters(pruned), 0.0)  # fmt: skip
    report.params_before = params_before
    report.structures = split.to_dict()
    return pruned, report


def prune_budgets_and_save(
    model: nn.Module,
    tokenizer,
    planner: Planner,
    targets: Sequence[float],
    structures: Sequence[str],
    folders: Sequence[str | Path],
    overwrite: bool = False,
    refit: str = "none",
    selfgen: SelfGenConfig = ANALYSIS_SELFGEN,
    records: Sequence[dict] | None = None,
    stages: StageTimes | None = None,
) -> list[PruneReport]:
    """`prune_and_save` for parameter budgets: one folder per budget. With a planner of
    `analysis="shared"`, the dense model is analysed once at the first budget and every budget
    is cut from that analysis (`apply_shared`).

    :param model: the dense model; cut in place at the last budget.
    :param tokenizer: saved beside each model.
    :param planner: decides each FFN cut.
    :param targets: fractions of all parameters to remove.
    :param structures: what may be removed (`prunenet.allocation.structures.parse_structures`).
    :param folders: output folders, as many as `targets`.
    :param overwrite: replace existing folders.
    :param refit: the FFN refit.
    :param selfgen: the self-generated text (written once, used by every budget).
    :param records: how each folder was made (`prunenet.runner`), one per folder, or None.
    :param stages: the run's stages so far (`prune_and_save`).
    """
    if len(targets) != len(folders):
        raise PruneNetError(f"Got {len(targets)} budgets for {len(folders)} output folders.")
    run = stages or StageTimes()
    with run.own_text():
        tokens = analysis_text(model, selfgen)
    # A shared planner's analysis of the dense model, made at the first budget (before any cut).
    shared = functools.cache(lambda: shared_analysis(model, tokens, refit))

    def cut(target, last: bool):
        return apply_budget(model, planner, target, structures, tokens, last, refit, shared)

    return _cut_and_save_each(targets, folders, cut, tokenizer, overwrite, records, run)


def _cut_and_save_each(
    requests,
    folders,
    cut,
    tokenizer,
    overwrite: bool,
    records: Sequence[dict] | None = None,
    stages: StageTimes | None = None,
) -> list[PruneReport]:
    """`cut(request, last)` for each request (the last may cut the dense model in place), each
    result saved atomically into its folder; `seconds` covers cutting and saving, `stages`
    are the run's so far plus each folder's cut and save."""
    reports = []
    for index, (request, folder) in enumerate(zip(requests, folders, strict=True)):
        start = time.perf_counter()
        times = (stages or StageTimes()).fork()
        with times.timing("cut"):
            pruned, report = cut(request, index == len(requests) - 1)
        record = records[index] if records else None
        _save_timed(pruned, tokenizer, folder, report, overwrite, record, times, start)
        reports.append(report)
    return reports


def apply_strategy(
    model: nn.Module,
    planner: Planner,
    strategy: Strategy,
    head_scores: Sequence[torch.Tensor] | None,
    tokens: torch.Tensor,
    in_place: bool = False,
    refit: str = "none",
) -> tuple[nn.Module, PruneReport]:
    """Cut `model` (or a copy) to a per-layer `strategy`: its heads, then its layers, then each
    kept layer's FFN rows through `planner`'s scores (sequential analysis and refit as asked).

    :param model: the dense model the strategy was made for.
    :param planner: scores the FFN rows; its per-layer amounts are replaced by the strategy's.
    :param strategy: from `prunenet.allocation.strategy.realise`.
    :param head_scores: per dense layer, query-head scores (`StrategyContext.head_rank`);
        needed when the strategy removes heads.
    :param tokens: the dense model's own text (the sequential analysis and the refit).
    :param in_place: cut `model` itself.
    :param refit: the FFN refit (`apply_plan`).
    :return: the pruned model and its report (`structures` holds the strategy).
    """
    params_before = count_parameters(model)
    pruned = model if in_place else copy.deepcopy(model)
    if any(strategy.query_heads):
        if head_scores is None:
            raise PruneNetError("This strategy removes heads: pass the head scores it used.")
        keep = [
            select_heads(scores, shape, shape.num_kv_heads, shape.group_size - removed)
            for scores, shape, removed in zip(
                head_scores, head_shapes(pruned.config), strategy.query_heads, strict=True
            )
        ]
        prune_heads(pruned, keep)
    if strategy.layers:
        drop_layers(pruned, strategy.layers)
    kept = [i for i in range(len(strategy.ffn_rows)) if i not in strategy.layers]
    widths = ffn_widths(pruned.config)
    rows = [strategy.ffn_rows[i] for i in kept]
    ratio = sum(rows) / sum(widths)
    plan = planner(pruned, ratio)
    plan.layer_keep = [width - removed for width, removed in zip(widths, rows, strict=True)]
    plan.info = {**plan.info, "allocation": f"strategy:{strategy.source}"}
    pruned, report = apply_plan(pruned, plan, ratio, True, refit, tokens=tokens)
    report.params_before = params_before
    report.structures = strategy.to_dict()
    return pruned, report


def prune_strategies_and_save(
    model: nn.Module,
    tokenizer,
    planner: Planner,
    strategies: Sequence[Strategy],
    head_scores: Sequence[torch.Tensor] | None,
    folders: Sequence[str | Path],
    overwrite: bool = False,
    refit: str = "none",
    selfgen: SelfGenConfig = ANALYSIS_SELFGEN,
    records: Sequence[dict] | None = None,
    stages: StageTimes | None = None,
    tokens: torch.Tensor | None = None,
) -> list[PruneReport]:
    """`prune_budgets_and_save` for per-layer strategies (one folder per strategy).

    :param model: the dense model; cut in place for the last strategy.
    :param tokenizer: saved beside each model.
    :param planner: scores each layer's FFN rows.
    :param strategies: from `prunenet.allocation.strategy` (a policy, the search, ...).
    :param head_scores: the query-head scores the strategies were measured with.
    :param folders: output folders, as many as `strategies`.
    :param overwrite: replace existing folders.
    :param refit: the FFN refit.
    :param selfgen: the analysis text (written once, used by every strategy).
    :param records: how each folder was made (`prunenet.runner`), one per folder, or None.
    :param stages: the run's stages so far (`prune_and_save`).
    :param tokens: the `selfgen` text when the caller already has it (the strategies were
        measured on part of it); None writes or reads it here.
    """
    if len(strategies) != len(folders):
        raise PruneNetError(f"Got {len(strategies)} strategies for {len(folders)} folders.")
    run = stages or StageTimes()
    if tokens is None:
        with run.own_text():
            tokens = analysis_text(model, selfgen)

    def cut(strategy, last: bool):
        return apply_strategy(model, planner, strategy, head_scores, tokens, last, refit)

    return _cut_and_save_each(strategies, folders, cut, tokenizer, overwrite, records, run)
