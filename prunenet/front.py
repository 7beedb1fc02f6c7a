"""Quality against size and against speed: a sweep of parameter budgets x per-layer strategies,
and its Pareto fronts.

Every (budget, strategy) cut goes through the code `prunenet prune --remove-params F --strategy S`
runs (`pipeline.apply_budget` for `uniform`, `make_strategy` then `pipeline.apply_strategy` for
the others), on one text and one strategy context written once for the whole grid, so a row is
the folder `prune` would ship. Each cut is evaluated by `EvaluationSuite` (perplexity, KL(dense ||
model) on the same windows) and its prefill speed-up is timed against the dense model here.

A front needs one quality number per point (`QUALITIES`: `log_ppl`, the mean log-perplexity over
the texts, or `kl`, their mean KL). `mark_fronts` flags the non-dominated points twice: quality vs
parameters and quality vs prefill speed-up; the dense model is a point of both.

Why this module is long (over 400 lines): the sweep, its front, and its three views (JSON record,
Markdown table, plot) are read together: a column or a marker means what the sweep measured.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from prunenet.allocation.strategy import (
    KL_SEQUENCES,
    Strategy,
    StrategyContext,
    strategy_context,
    strategy_text_shape,
)
from prunenet.allocation.structures import check_budget
from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.analysis.sequential import ANALYSIS_SELFGEN, analysis_text
from prunenet.core.compress import PruneReport
from prunenet.core.devices import describe_device, model_device
from prunenet.core.refit import check_refit
from prunenet.errors import PruneNetError
from prunenet.evaluation.data import data_versions
from prunenet.evaluation.pareto import non_dominated
from prunenet.evaluation.plots import FrontPoint
from prunenet.evaluation.plots import plot_fronts as draw_fronts
from prunenet.evaluation.speed import DEFAULT_PREFILL_TOKENS, compare_speed, parameter_counts
from prunenet.evaluation.suite import (
    METRIC_DEFINITIONS,
    EvaluationSuite,
    SuiteResult,
    software_versions,
)
from prunenet.evaluation.zero_shot import zero_shot_average
from prunenet.io.saving import atomic_directory
from prunenet.pipeline import Planner, apply_budget, apply_strategy
from prunenet.rl.strategy import STRATEGIES, StrategyPolicy, make_strategy
from prunenet.tables import markdown_table

QUALITIES: dict[str, str] = {
    "log_ppl": "mean over the perplexity texts of ln(perplexity), i.e. the log of their "
    "geometric mean (lower is better)",
    "kl": "mean over the perplexity texts of the mean per-token KL(dense || model) in nats "
    "(lower is better)",
}
QUALITY_LABELS = {"log_ppl": "mean log-perplexity", "kl": "mean KL(dense || model)"}
DEFAULT_SPEED_ROUNDS = 3
STRUCTURES = ("ffn",)  # what the sweep cuts: FFN rows (prune's default --structures)
DENSE = "dense"
JSON_FILE, MARKDOWN_FILE, PLOT_FILE = "pareto.json", "pareto.md", "pareto.png"
# The dense model's logits are cached for every row unless they would take more than this.
REFERENCE_CACHE_BYTES = 4 * 1024**3


@dataclass
class SweepSettings:
    """What the sweep cuts and how it measures it.

    :param budgets: fractions of all parameters to remove, each in (0, 1), no repeats.
    :param strategies: names from `STRATEGIES`, no repeats (one row per budget x strategy).
    :param quality: the scalar each front is drawn on (`QUALITIES`).
    :param refit: the FFN refit of every cut (`none`, `bias`, `lsq`; prune's default `lsq`).
    :param selfgen: the dense model's analysis text (sequential analysis and refit), written
        once for every row.
    :param search_evaluations: random strategies measured per budget for `search`.
    :param seed: the search's seed and the speed measurement's token ids.
    :param speed_rounds: alternated prefill timing rounds per row (0: no speed, so no row is on
        the speed front except the dense one).
    :param prefill_tokens: tokens of the timed batch-1 prefill.
    """

    budgets: Sequence[float]
    strategies: Sequence[str]
    quality: str = "log_ppl"
    refit: str = "lsq"
    selfgen: SelfGenConfig = ANALYSIS_SELFGEN
    search_evaluations: int = 32
    seed: int = 0
    speed_rounds: int = DEFAULT_SPEED_ROUNDS
    prefill_tokens: int = DEFAULT_PREFILL_TOKENS

    def check(self) -> SweepSettings:
        """Refuse a grid that cannot run, before any model is read; returns itself."""
        check_strategies(self.strategies)
        if not self.budgets:
            raise PruneNetError("No parameter budget given; pass fractions in (0, 1).")
        for budget in self.budgets:
            if not (isinstance(budget, int | float) and math.isfinite(budget) and 0 < budget < 1):
                raise PruneNetError(f"Budget {budget!r} is not a fraction in (0, 1).")
        if len(set(self.budgets)) != len(self.budgets):
            raise PruneNetError(f"Budgets {list(self.budgets)} repeat a value; list each once.")
        if self.quality not in QUALITIES:
            raise PruneNetError(
                f"Unknown quality {self.quality!r}; choose from {', '.join(QUALITIES)}."
            )
        check_refit(self.refit)
        if self.search_evaluations < 1 or self.speed_rounds < 0 or self.prefill_tokens < 1:
            raise PruneNetError(
                "search_evaluations and prefill_tokens must be at least 1, speed_rounds at least 0."
            )
        return self


@dataclass
class ParetoRow:
    """One point: a (budget, strategy) cut, or the dense model, with what was measured.

    :param strategy: the strategy's name (`dense` for the dense model).
    :param budget: the requested fraction of all parameters to remove (0 for dense).
    :param params: parameters of the cut model (tied embeddings counted once).
    :param params_removed: 1 - params / dense params.
    :param ffn_rows_removed: share of all FFN rows removed.
    :param ffn_widths: FFN rows kept per layer.
    :param perplexity: perplexity per text.
    :param kl: KL(dense || model) per text, nats/token (0 for dense).
    :param quality: the scalar of `SweepSettings.quality` (None when a value is not finite).
    :param speedup_prefill: median prefill tokens/s over the dense model's (1 for dense; None
        when not timed).
    :param paired_speedup_prefill: median of the per-round ratios.
    :param prefill_tok_s: the cut model's median prefill tokens/s.
    :param dense_prefill_tok_s: the dense model's, in the same rounds.
    :param zero_shot_average: mean zero-shot score when zero-shot tasks were run.
    :param strategy_kl: the strategy's masked KL on held-out self-generated text (ramp, policy,
        search), the number it was chosen by.
    :param strategy_detail: what the cut recorded (`PruneReport.structures`, e.g. the ramp's
        slope or the search's evaluations).
    :param cut_seconds: building the strategy and cutting (with the refit).
    :param eval_seconds: the evaluation suite.
    :param speed_seconds: the speed measurement.
    :param front_params: on the quality-vs-parameters front.
    :param front_speed: on the quality-vs-prefill-speed-up front.
    :param evaluation: the suite's full result (per text: tokens, windows, seconds, ...).
    """

    strategy: str
    budget: float
    params: int
    params_removed: float
    ffn_rows_removed: float
    ffn_widths: list[int]
    perplexity: dict[str, float]
    kl: dict[str, float]
    quality: float | None
    speedup_prefill: float | None = None
    paired_speedup_prefill: float | None = None
    prefill_tok_s: float | None = None
    dense_prefill_tok_s: float | None = None
    zero_shot_average: float | None = None
    strategy_kl: float | None = None
    strategy_detail: dict = field(default_factory=dict)
    cut_seconds: float = 0.0
    eval_seconds: float = 0.0
    speed_seconds: float = 0.0
    front_params: bool = False
    front_speed: bool = False
    evaluation: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ParetoResult:
    """A whole sweep: the dense point, one row per (budget, strategy), and the protocol.

    :param dense: the dense model's point.
    :param rows: the grid, budgets outer, strategies inner, in the order given.
    :param protocol: everything that defines the numbers (`sweep`).
    """

    dense: ParetoRow
    rows: list[ParetoRow]
    protocol: dict

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "dense": self.dense.to_dict(),
                "rows": [row.to_dict() for row in self.rows]}  # fmt: skip


# --------------------------------------------------------------------------- public entry points


def check_strategies(names: Sequence[str]) -> tuple[str, ...]:
    """`names` if they are known strategies (`STRATEGIES`), at least one, none twice.

    :param names: strategy names, in the order the grid runs them.
    """
    if not names:
        raise PruneNetError(f"No strategy given; choose from {', '.join(STRATEGIES)}.")
    unknown = [name for name in names if name not in STRATEGIES]
    if unknown:
        raise PruneNetError(
            f"Unknown strategy {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(STRATEGIES)} (comma-separated)."
        )
    if len(set(names)) != len(names):
        raise PruneNetError(f"Strategies {list(names)} repeat a name; list each once.")
    return tuple(names)


def sweep(
    model: nn.Module,
    planner: Planner,
    suite: EvaluationSuite,
    settings: SweepSettings,
    policy: StrategyPolicy | None = None,
    progress: Callable[[ParetoRow], None] | None = None,
) -> ParetoResult:
    """Cut `model` at every (budget, strategy), evaluate each cut, mark both Pareto fronts.

    The dense model writes its analysis text and (for ramp, policy, search) its strategy
    context once; every cut is a copy, so `model` stays dense.

    :param model: the dense model (never modified).
    :param planner: scores the FFN rows of every cut (`pipeline.scorer_planner`, as prune builds
        it).
    :param suite: the evaluation, with `cache_reference` when the dense logits fit
        (`pareto_suite`); needs at least one perplexity text.
    :param settings: the grid and the measurement (`SweepSettings`, checked here again).
    :param policy: a loaded strategy policy (`rl.strategy.load_strategy_policy`), for `policy`.
    :param progress: called with each finished row (the dense one first).
    :return: the rows with their fronts marked, and the protocol.
    """
    settings.check()
    if not suite.ppl_tasks:
        raise PruneNetError("The Pareto quality is measured on perplexity texts: give one.")
    if "policy" in settings.strategies and policy is None:
        raise PruneNetError("Strategy 'policy' needs a strategy policy; pass one.")
    for budget in settings.budgets:  # before the dense evaluation, not after it
        check_budget(model, budget, STRUCTURES)
    start = time.perf_counter()
    dense_counts = parameter_counts(model)
    dense_result = suite.run(model, reference=model)  # KL exactly 0; fills the logits cache
    dense = _row(DENSE, 0.0, model, dense_counts, dense_result, settings.quality)
    dense.speedup_prefill = 1.0
    dense.eval_seconds = time.perf_counter() - start
    if progress is not None:
        progress(dense)
    text_start = time.perf_counter()
    tokens = analysis_text(model, settings.selfgen)
    text_seconds = time.perf_counter() - text_start
    context, context_seconds = None, 0.0
    if any(name != "uniform" for name in settings.strategies):
        context_start = time.perf_counter()
        # One context serves every strategy; only the policy reads the (costly) descriptors.
        context = strategy_context(
            model, tokens, settings.refit != "none", describe="policy" in settings.strategies
        )
        context_seconds = time.perf_counter() - context_start
    grid = [(budget, name) for budget in settings.budgets for name in settings.strategies]
    rows = []
    bar = tqdm(grid, desc="pareto grid (budget x strategy)", unit="cut")
    for budget, name in bar:
        bar.set_postfix(budget=f"{budget:g}", strategy=name)
        cut_start = time.perf_counter()
        pruned, report, strategy = cut(
            model, planner, name, budget, tokens, context, settings.refit, policy,
            settings.search_evaluations, settings.seed,
        )  # fmt: skip
        cut_seconds = time.perf_counter() - cut_start
        eval_start = time.perf_counter()
        result = suite.run(pruned, reference=model)
        row = _row(name, budget, pruned, dense_counts, result, settings.quality)
        row.eval_seconds = time.perf_counter() - eval_start
        row.cut_seconds = cut_seconds
        row.strategy_detail = dict(report.structures or {})
        row.strategy_kl = strategy.kl if strategy is not None else None
        if settings.speed_rounds:
            _time_prefill(row, model, pruned, settings)
        rows.append(row)
        del pruned
        gc.collect()
        if progress is not None:
            progress(row)
    bar.close()
    mark_fronts([dense, *rows])
    protocol = sweep_protocol(model, suite, settings, dense_counts.total)
    protocol.update(text_seconds=text_seconds, context_seconds=context_seconds,
                    wall_seconds=time.perf_counter() - start)  # fmt: skip
    return ParetoResult(dense, rows, protocol)


def cut(
    model: nn.Module,
    planner: Planner,
    strategy: str,
    target: float,
    tokens: torch.Tensor,
    context: StrategyContext | None,
    refit: str = "lsq",
    policy: StrategyPolicy | None = None,
    search_evaluations: int = 32,
    seed: int = 0,
) -> tuple[nn.Module, PruneReport, Strategy | None]:
    """A copy of `model` cut to `target` by `strategy`, the way `prunenet prune --remove-params
    target --strategy strategy` cuts it (FFN rows only).

    :param model: the dense model (left dense).
    :param planner: scores the FFN rows.
    :param strategy: `uniform` (the same rows from every layer, `pipeline.apply_budget`) or
        `ramp`, `policy`, `search` (`rl.strategy.make_strategy`, then `pipeline.apply_strategy`).
    :param target: fraction of all parameters to remove.
    :param tokens: the dense model's analysis text (`analysis_text`).
    :param context: the dense model's `StrategyContext` (None for `uniform`).
    :param refit: the FFN refit.
    :param policy: the strategy policy, for `policy`.
    :param search_evaluations: random strategies measured, for `search`.
    :param seed: the search's seed.
    :return: the cut model, its report, and the strategy (None for `uniform`).
    """
    if strategy == "uniform":
        pruned, report = apply_budget(model, planner, target, STRUCTURES, tokens, refit=refit)
        return pruned, report, None
    if context is None:
        raise PruneNetError(f"Strategy {strategy!r} needs the model's StrategyContext.")
    chosen = make_strategy(strategy, context, target, STRUCTURES, policy, search_evaluations, seed)
    pruned, report = apply_strategy(model, planner, chosen, context.head_rank, tokens, refit=refit)
    return pruned, report, chosen


def quality_of(perplexity: dict[str, float], kl: dict[str, float], quality: str) -> float | None:
    """The one number a front is drawn on (`QUALITIES`); None when a value is not finite.

    :param perplexity: perplexity per text.
    :param kl: KL(dense || model) per text.
    :param quality: `log_ppl` or `kl`.
    """
    if quality == "log_ppl":
        values = [math.log(v) if v > 0 else math.nan for v in perplexity.values()]
    elif quality == "kl":
        values = list(kl.values())
    else:
        raise PruneNetError(f"Unknown quality {quality!r}; choose from {', '.join(QUALITIES)}.")
    if not values or not all(math.isfinite(v) for v in values):
        return None
    return sum(values) / len(values)


def mark_fronts(rows: Sequence[ParetoRow]) -> None:
    """Set `front_params` (quality and parameters, both lower is better) and `front_speed`
    (quality lower, prefill speed-up higher) on every row, over all `rows` together.

    :param rows: the points (a row without quality or without speed-up is never on a front).
    """
    size = [(row.params, row.quality) for row in rows]
    speed = [(row.speedup_prefill, row.quality) for row in rows]
    for row, flag in zip(rows, non_dominated(size, ["min", "min"]), strict=True):
        row.front_params = flag
    for row, flag in zip(rows, non_dominated(speed, ["max", "min"]), strict=True):
        row.front_speed = flag


def pareto_suite(
    model: nn.Module,
    tokenizer,
    ppl_tasks: Sequence[str],
    zero_shot_tasks: Sequence[str] = (),
    seqlen: int = 512,
    ppl_windows: int = 8,
    limit: int | None = None,
) -> EvaluationSuite:
    """The `EvaluationSuite` of a sweep: the dense logits cached for every row when they fit in
    `REFERENCE_CACHE_BYTES` (texts x windows x (seqlen + 1) x vocabulary x 4 bytes).

    :param model: the dense model.
    :param tokenizer: its tokenizer.
    :param ppl_tasks: perplexity texts (the quality is measured on them).
    :param zero_shot_tasks: lm-eval tasks (recorded, not part of the quality).
    :param seqlen: window length in tokens.
    :param ppl_windows: windows per text (0: the whole text, then nothing is cached).
    :param limit: first N documents per zero-shot task.
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    cached = len(ppl_tasks) * ppl_windows * (seqlen + 1) * vocab * 4
    fits = bool(ppl_windows) and cached <= REFERENCE_CACHE_BYTES
    return EvaluationSuite(tokenizer, ppl_tasks, zero_shot_tasks, seqlen=seqlen,
                           ppl_windows=ppl_windows, limit=limit, cache_reference=fits)  # fmt: skip


def sweep_protocol(
    model: nn.Module, suite: EvaluationSuite, settings: SweepSettings, dense_params: int
) -> dict:
    """Everything that defines a sweep's numbers, for `pareto.json`.

    :param model: the dense model.
    :param suite: the evaluation.
    :param settings: the grid.
    :param dense_params: the dense model's parameters.
    """
    device = model_device(model)
    sequences, length = strategy_text_shape(settings.selfgen.sequences, settings.selfgen.length)
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model_type": model.config.model_type,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "dense_params": dense_params,
        "budgets": list(settings.budgets),
        "strategies": list(settings.strategies),
        "structures": list(STRUCTURES),
        "refit": settings.refit,
        "analysis_text": asdict(settings.selfgen),
        # Strategies read part of the analysis text (`strategy_tokens`), not a text of their own.
        "strategy_text": {"part_of": "analysis_text", "sequences": sequences, "length": length},
        "strategy_kl_sequences": KL_SEQUENCES,
        "search_evaluations": settings.search_evaluations,
        "seed": settings.seed,
        "quality": settings.quality,
        "quality_definition": QUALITIES[settings.quality],
        "fronts": "front_params: non-dominated on (params, quality), both lower is better; "
        "front_speed: non-dominated on (prefill speed-up higher, quality lower); the dense "
        "model is a point of both (speed-up 1 by definition, KL 0)",
        "evaluation": suite.protocol(),
        "speed": {
            "rounds": settings.speed_rounds,
            "warmup": 1,
            "prefill_tokens": settings.prefill_tokens,
            "decode": "not measured",
            "definition": METRIC_DEFINITIONS["speed"],
        },
        "device": describe_device(device),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "versions": software_versions(),
        "data_packages": data_versions(),
        "metric_definitions": METRIC_DEFINITIONS,
    }


def write_outputs(result: ParetoResult, out: str | Path, overwrite: bool = False) -> list[Path]:
    """`pareto.json`, `pareto.md` and `pareto.png` in `out`, published at once (the folder is
    complete or absent: `io.saving.atomic_directory`).

    :param result: from `sweep`.
    :param out: the output folder.
    :param overwrite: replace an existing `out` that is a pareto folder (holds `pareto.json`).
    :return: the written paths (under `out`).
    """
    with atomic_directory(out, overwrite, replaces=JSON_FILE) as staging:
        (staging / JSON_FILE).write_text(json.dumps(result.to_dict(), indent=2))
        (staging / MARKDOWN_FILE).write_text(markdown_report(result))
        plot_fronts(result, staging / PLOT_FILE)
    return [Path(out) / name for name in (JSON_FILE, MARKDOWN_FILE, PLOT_FILE)]


def table(result: ParetoResult) -> tuple[list[str], list[list]]:
    """Headers and rounded rows (dense first) for the terminal and the Markdown table.

    :param result: from `sweep`.
    """
    protocol = result.protocol
    tasks = protocol["evaluation"]["ppl_tasks"]
    label = QUALITY_LABELS[protocol["quality"]]
    headers = ["budget", "strategy", "params", "params removed",
               *(f"ppl {t.removeprefix('ppl_')}" for t in tasks),
               f"KL {' / '.join(t.removeprefix('ppl_') for t in tasks)}",
               f"quality: {label}", "prefill speed-up", "front"]  # fmt: skip
    rows = []
    for row in [result.dense, *result.rows]:
        front = "".join(mark for flag, mark in ((row.front_params, "P"), (row.front_speed, "S"))
                        if flag)  # fmt: skip
        rows.append([
            "-" if row.strategy == DENSE else f"{row.budget:g}",
            row.strategy,
            row.params,
            f"{100 * row.params_removed:.1f}%",
            *(_number(row.perplexity[t], ".2f") for t in tasks),
            " / ".join(_number(row.kl.get(t), ".3f") for t in tasks),
            _number(row.quality, ".4f"),
            _number(row.speedup_prefill, ".2f"),
            front or "-",
        ])  # fmt: skip
    return headers, rows


def markdown_report(result: ParetoResult) -> str:
    """The table with what it measured above it: the quality, the fronts, the protocol.

    :param result: from `sweep`.
    """
    p = result.protocol
    evaluation, speed, text = p["evaluation"], p["speed"], p["analysis_text"]
    headers, rows = table(result)
    lines = [
        f"# Pareto fronts: {p.get('model', p['model_type'])}",
        "",
        f"- quality = {QUALITY_LABELS[p['quality']]}: {p['quality_definition']}",
        "- front: P = no other row has at most as many parameters and at least as good a "
        "quality (one of them strictly); S = the same with prefill speed-up (higher) instead "
        "of parameters; the dense model counts as speed-up 1",
        f"- cuts: `prunenet prune --remove-params B --strategy S` (FFN rows only, refit "
        f"{p['refit']}), analysis text {text['sequences']} x {text['length']} tokens (seed "
        f"{text['seed']}) written once; strategies chosen on {p['strategy_text']['sequences']} x "
        f"{p['strategy_text']['length']} tokens of it; search: {p['search_evaluations']} "
        f"evaluations, seed {p['seed']}",
        f"- perplexity and KL: {evaluation['ppl_windows'] or 'all'} windows x "
        f"{evaluation['seqlen']} tokens per text, BOS {evaluation['ppl_bos_token'] or 'none'} "
        "prepended",
        f"- speed-up: median prefill tokens/s over dense, 1 x {speed['prefill_tokens']} tokens, "
        f"{speed['rounds']} alternated rounds after {speed['warmup']} warm-up; {p['device']}, "
        f"{p['threads']} thread(s)",
    ]
    if "command" in p:
        lines.append(f"- command: `{p['command']}`")
    return "\n".join([*lines, "", markdown_table(headers, rows), ""])


def plot_fronts(result: ParetoResult, path: str | Path) -> Path:
    """Quality against the share of parameters removed and against the prefill speed-up, one
    marker per strategy, each front ringed and drawn as a line (`prunenet.evaluation.plots`).

    :param result: from `sweep`.
    :param path: the PNG to write.
    """
    points = [
        FrontPoint(
            row.strategy,
            row.params_removed,
            row.speedup_prefill,
            row.quality,
            bool(row.front_params),
            bool(row.front_speed),
        )  # fmt: skip
        for row in [result.dense, *result.rows]
    ]
    title = (f"{result.protocol.get('model', result.protocol['model_type'])}: quality vs "
             "size and vs speed (line: Pareto front)")  # fmt: skip
    return draw_fronts(points, path, title=title,
                       quality_label=QUALITY_LABELS[result.protocol["quality"]],
                       join_front=True)  # fmt: skip


# --------------------------------------------------------------------------- helpers


def _row(strategy, budget, model, dense_counts, result: SuiteResult, quality: str) -> ParetoRow:
    counts = parameter_counts(model)
    perplexity = {task: r.perplexity for task, r in result.perplexity.items()}
    kl = {task: r.mean_kl for task, r in result.kl.items()}
    average = None
    if result.zero_shot is not None:
        average, _ = zero_shot_average(result.zero_shot["tasks"])
    return ParetoRow(
        strategy=strategy,
        budget=budget,
        params=counts.total,
        params_removed=1 - counts.total / dense_counts.total,
        ffn_rows_removed=1 - sum(counts.ffn_widths) / sum(dense_counts.ffn_widths),
        ffn_widths=counts.ffn_widths,
        perplexity=perplexity,
        kl=kl,
        quality=quality_of(perplexity, kl, quality),
        zero_shot_average=average,
        evaluation=result.to_dict(),
    )


def _time_prefill(
    row: ParetoRow, dense: nn.Module, pruned: nn.Module, settings: SweepSettings
) -> None:
    start = time.perf_counter()
    speed = compare_speed(dense, pruned, prefill_tokens=settings.prefill_tokens,
                          decode_batch_sizes=(), rounds=settings.speed_rounds,
                          seed=settings.seed)  # fmt: skip
    prefill = speed.rows[0]
    row.speedup_prefill, row.paired_speedup_prefill = prefill.speedup, prefill.paired_speedup
    row.prefill_tok_s, row.dense_prefill_tok_s = prefill.model.median, prefill.reference.median
    row.speed_seconds = time.perf_counter() - start


def _number(value, spec: str) -> str:
    return "" if value is None or not math.isfinite(value) else format(value, spec)
