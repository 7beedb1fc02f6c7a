"""The pruning loop, in one place: score -> how much per layer -> cut -> save.

`prunenet prune` and `scripts/benchmark_quality.py` both go through here, so the benchmark
measures exactly what the command ships. The stages it strings together:

1. a `Planner` decides, for a model and a target ratio, each layer's row scores and how many
   rows each layer keeps (`PrunePlan`); `scorer_planner` is the standard one: a scorer's
   ranking (computed once and reused for every ratio, unless the scorer observes the ratio, as
   a policy does) with a uniform or self-generated ("auto") per-layer allocation;
2. `apply_plan` cuts a model (or a copy) to that plan (`prunenet.core.compress.prune_model`);
3. `prune_and_save` does both for a list of ratios and saves each result atomically.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunenet.allocation.budget import DEFAULT_MAX_RATIO, keep_counts
from prunenet.allocation.sensitivity import ALLOCATIONS, auto_allocation
from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.analysis.sequential import REFIT_SELFGEN, SequentialRefit
from prunenet.core.arch import ffn_widths
from prunenet.core.compress import PruneReport, prune_model
from prunenet.core.ratios import uniform_keep
from prunenet.core.refit import REFITS
from prunenet.errors import PruneNetError
from prunenet.io.saving import save_pruned
from prunenet.scoring.base import Scorer


@dataclass
class PrunePlan:
    """What to cut at one ratio: scores and kept rows per layer, and how they were decided.

    :param scores: one importance vector per decoder layer (higher = keep).
    :param layer_keep: rows kept per layer.
    :param info: what to record about the method (scorer, allocation, ...).
    """

    scores: list[torch.Tensor]
    layer_keep: list[int]
    info: dict = field(default_factory=dict)


# (dense model, target ratio) -> plan. A planner must not modify the model.
Planner = Callable[[nn.Module, float], PrunePlan]


def scorer_planner(
    scorer: Scorer, allocation: str = "uniform", max_layer_ratio: float = DEFAULT_MAX_RATIO
) -> Planner:
    """The standard planner: `scorer`'s ranking with a uniform or an automatic allocation.

    The scores are computed on the first call and reused for later ratios, because for a
    ratio-blind scorer one ranking serves every ratio (and scoring is the slow part); a
    ratio-aware scorer (`Scorer.ratio_aware`, e.g. a policy that observes the ratio) is asked
    again at every ratio.

    :param scorer: ranks each layer's rows.
    :param allocation: `uniform` (the same ratio in every layer) or `auto` (the same total,
        spread by self-generated layer sensitivity; `prunenet.allocation.sensitivity`).
    :param max_layer_ratio: the most `auto` removes from one layer.
    """
    if allocation not in ALLOCATIONS:
        raise PruneNetError(
            f"Unknown allocation {allocation!r}; choose {' or '.join(ALLOCATIONS)}."
        )
    cached: list[list[torch.Tensor]] = []

    def plan(model: nn.Module, ratio: float) -> PrunePlan:
        if scorer.ratio_aware or not cached:
            cached[:] = [scorer.score_model(model, ratio=ratio)]
        widths = ffn_widths(model.config)
        if allocation == "auto":
            layer_keep = keep_counts(widths, auto_allocation(model, scorer, ratio, max_layer_ratio))
        else:
            layer_keep = uniform_keep(widths, ratio)
        return PrunePlan(cached[0], layer_keep, {**scorer.describe(), "allocation": allocation})

    return plan


def apply_plan(
    model: nn.Module,
    plan: PrunePlan,
    ratio: float,
    in_place: bool = False,
    refit: str = "none",
    refit_selfgen: SelfGenConfig = REFIT_SELFGEN,
) -> tuple[nn.Module, PruneReport]:
    """Cut `model` (or a deep copy, leaving `model` dense) to `plan`, refitting if asked.

    :param model: the dense model.
    :param plan: from a `Planner` at `ratio`.
    :param ratio: the target ratio (recorded in the report).
    :param in_place: prune `model` itself instead of a copy (saves memory for the last ratio).
    :param refit: `none` (the plain cut), `bias` or `lsq`: repair each layer's output
        projection on self-generated activations, layer by layer (`prunenet.analysis.
        sequential`); the report records the ridge and held-out errors per layer.
    :param refit_selfgen: the self-generated text the refit fits on (a quarter held out).
    :return: the pruned model and what was done to it.
    """
    check_refit(refit)
    pruned = model if in_place else copy.deepcopy(model)
    cut = None if refit == "none" else SequentialRefit(pruned, refit, refit_selfgen)
    report = prune_model(pruned, plan.scores, plan.layer_keep, target_ratio=ratio, cut=cut)
    report.scorer = dict(plan.info)
    if cut is not None:
        report.scorer["refit"] = cut.log.to_dict()
    return pruned, report


def check_refit(refit: str) -> str:
    """`refit` if it names a refit (`prunenet.core.refit.REFITS`), else a clear error."""
    if refit not in REFITS:
        raise PruneNetError(f"Unknown refit {refit!r}; choose one of {', '.join(REFITS)}.")
    return refit


def prune_and_save(
    model: nn.Module,
    tokenizer,
    planner: Planner,
    ratios: Sequence[float],
    folders: Sequence[str | Path],
    overwrite: bool = False,
    refit: str = "none",
    refit_selfgen: SelfGenConfig = REFIT_SELFGEN,
) -> list[PruneReport]:
    """Prune at each ratio and save each result atomically into its folder.

    :param model: the dense model; pruned in place at the last ratio (the others use copies).
    :param tokenizer: saved beside each model (None: the folders get none).
    :param planner: decides each ratio's cut.
    :param ratios: target ratios, one folder each.
    :param folders: output folders, as many as `ratios`.
    :param overwrite: replace existing folders.
    :param refit: `none`, `bias` or `lsq` (`apply_plan`).
    :param refit_selfgen: the self-generated text a refit fits on.
    :return: one report per ratio, with `seconds` covering planning, cutting and saving.
    """
    check_refit(refit)
    if len(ratios) != len(folders):
        raise PruneNetError(f"Got {len(ratios)} ratios for {len(folders)} output folders.")
    reports = []
    for index, (ratio, folder) in enumerate(zip(ratios, folders, strict=True)):
        start = time.perf_counter()
        plan = planner(model, ratio)
        last = index == len(ratios) - 1
        pruned, report = apply_plan(model, plan, ratio, last, refit, refit_selfgen)
        save_pruned(pruned, tokenizer, folder, report, overwrite=overwrite)
        report.seconds = time.perf_counter() - start
        reports.append(report)
    return reports
