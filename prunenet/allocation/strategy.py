"""How much of each layer: a per-layer, per-structure strategy that meets a parameter budget.

A *strategy* says, for every decoder layer, how many FFN rows go, how many query heads go from
each KV group, and whether the whole layer goes. `split_budget` (`structures.py`) only picks
the same counts for every layer; a strategy can spare the layers that matter and take more
where it is cheap. Strategies come from raw per-layer actions (`realise`), which is what makes
them learnable (`envs/strategy.py`, `PruneNet/Strategy-v0`) and searchable (`random_search`):

- every layer proposes three numbers in [-1, 1]: an FFN weight exponent `a` (the layer's share
  of the FFN cut is proportional to 4**a, so all zeros is the uniform cut), a head level (at
  `h > 0`, `floor(h x group size)` query heads per KV group, at most all but one) and a drop
  level (the layer goes when it is above `DROP_LEVEL`);
- `realise` then meets the budget exactly, as AMC does by rescaling: drops are taken in order of
  their level while they fit the budget, then heads in order of their level while they fit,
  and the FFN fills the rest: one scale for all the weights, capped at `MAX_FFN_RATIO` of a
  layer, integer rows by largest remainder, so the result removes at least the budget and at
  most one FFN row more.

The quality of a strategy is KL(dense || model with the strategy applied as masks,
`trials.masked`) on held-out self-generated text, computed by the evaluation's own KL code
(`prunenet.evaluation.divergence`, dense logits cached): one forward pass per strategy, no weight
touched, and exactly the KL the evaluation would report for the cut model on those tokens.
`StrategyContext` holds everything that measurement and the descriptors need, computed once
per model.

Why this module is long (over 400 lines): the action-to-strategy mapping, the context that
measures and describes strategies, and the hand-made and search baselines are read together:
the baselines are only fair if they go through the same `realise` and the same KL.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from prunenet.allocation.structures import MAX_FFN_RATIO, STRUCTURES, Costs
from prunenet.allocation.trials import masked
from prunenet.analysis.influence import block_influence
from prunenet.analysis.unit_ranks import ffn_activation_scores, head_ranks
from prunenet.core.arch import head_removal_blocker
from prunenet.errors import PruneNetError
from prunenet.evaluation.divergence import ReferenceCache, kl_and_perplexity
from prunenet.evaluation.perplexity import TokenWindows

FFN_BASE = 4.0  # an FFN action a in [-1, 1] weighs the layer's share of the cut by FFN_BASE**a
DROP_LEVEL = 0.5  # a layer whose drop action is above this is dropped (while the budget allows)
# What a strategy policy's actions are relative to: nothing (`uniform`: its FFN exponents are the
# strategy's) or the request's best depth ramp (`ramp`: it corrects the ramp's exponents, so
# learning starts from the best hand-made rule instead of rediscovering it).
BASES = ("uniform", "ramp")
RESIDUAL_SCALE = 0.5  # on a ramp base, an FFN action a moves the ramp's exponent by 0.5 x a
PROBE_RATIO = 0.3  # the per-layer sensitivity descriptor: KL with this share of its FFN masked
# How much of the run's own text strategies are described and measured on, whatever the text
# budget: the policy's descriptors must mean at prune time what they meant in training. A text
# smaller than this is used whole (`strategy_text_shape`; `prunenet pareto` records the shape).
STRATEGY_SEQUENCES, STRATEGY_LENGTH = 64, 128
KL_SEQUENCES = 4  # held-out self-generated sequences a strategy's KL is measured on
DESCRIPTORS = (
    "depth",  # relative position, 0 (first) .. 1 (last)
    "layer_share",  # the layer's parameters / all parameters
    "ffn_share",  # the layer's FFN parameters / its parameters
    "influence",  # block influence (1 - cos(input, output)), ShortGPT
    "log_skip_kl",  # log10 KL when the layer is skipped
    "log_ffn_kl",  # log10 KL when PROBE_RATIO of its FFN rows (lowest scores) are masked
    "ffn_low_share",  # share of the layer's FFN score mass in its lowest PROBE_RATIO rows
    "head_low_share",  # share of its query-head score mass in its weakest head per group
)

# Per step, beside the layer's descriptors: the request, how far through the layers, the mean
# FFN exponent proposed so far (natural log of the weight), and the parameter shares of the
# layers proposed for dropping and of the heads proposed so far, both over the budget. A policy
# on the ramp base also sees the base's slope (`BASE_CONTEXT`).
CONTEXT = ("budget", "progress", "mean_ffn_log_weight", "drop_share", "head_share")
BASE_CONTEXT = ("ramp_slope",)


@dataclass
class Strategy:
    """One request's cut, per dense layer.

    :param target: fraction of all parameters to remove.
    :param ffn_rows: FFN rows removed per dense layer (0 for a dropped layer).
    :param query_heads: query heads removed from every KV group, per dense layer.
    :param layers: dropped layers (dense indices).
    :param params_dense: parameters of the dense model.
    :param params_removed: parameters the strategy removes (counting refit biases if asked).
    :param source: what made it (`uniform`, `policy`, `search`, ...).
    :param kl: its masked KL on the held-out text, when measured.
    :param extra: what its maker records (search evaluations and seed, the ramp's slope).
    """

    target: float
    ffn_rows: list[int]
    query_heads: list[int]
    layers: list[int]
    params_dense: int
    params_removed: int
    source: str = ""
    kl: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def removed_fraction(self) -> float:
        return self.params_removed / self.params_dense

    def trial(self) -> dict:
        """The strategy as a `trials.masked` trial."""
        return {"rows": list(self.ffn_rows), "query": list(self.query_heads), "groups": 0,
                "dropped": list(self.layers)}  # fmt: skip

    def to_dict(self) -> dict:
        return {**asdict(self), "removed_fraction": self.removed_fraction}


def realise(
    actions: np.ndarray,
    target: float,
    costs: Costs,
    structures: Sequence[str] = STRUCTURES,
    source: str = "",
) -> Strategy:
    """Turn per-layer actions into a strategy that removes `target` of the parameters exactly
    (at least the budget, at most one FFN row more).

    :param actions: layers x 3 array in [-1, 1]: FFN weight exponent, head level, drop level
        (values outside are clipped; columns of structures not allowed are ignored).
    :param target: fraction of all parameters to remove, in (0, 1).
    :param costs: `structures.Costs` of the dense model.
    :param structures: which of ffn, heads, layers may be cut (`ffn` is required: it meets the
        budget exactly).
    :param source: recorded as `Strategy.source`.
    """
    count = len(costs.layer)
    actions = np.clip(np.asarray(actions, dtype=np.float64).reshape(count, 3), -1.0, 1.0)
    if "ffn" not in structures:
        raise PruneNetError("A per-layer strategy needs ffn among the structures.")
    goal = int(round(target * costs.dense))
    dropped: list[int] = []
    if "layers" in structures:
        for index in np.argsort(-actions[:, 2], kind="stable"):
            if actions[index, 2] <= DROP_LEVEL or len(dropped) == count - 1:
                break
            if costs.removed(0, 0, 0, [*dropped, int(index)]) <= goal:
                dropped.append(int(index))
    query = [0] * count
    if "heads" in structures and costs.heads is not None:
        for index in np.argsort(-actions[:, 1], kind="stable"):
            shape = costs.shapes[index]
            heads = _heads_for(actions[index, 1], shape.group_size)
            if index in dropped or heads == 0:
                continue
            trial = [*query]
            trial[index] = heads
            if costs.removed(0, trial, 0, dropped) <= goal:
                query = trial
    rows = _fill_ffn(actions[:, 0], goal, costs, query, dropped)
    return Strategy(
        target=target,
        ffn_rows=rows,
        query_heads=query,
        layers=sorted(dropped),
        params_dense=costs.dense,
        params_removed=costs.removed(rows, query, 0, dropped),
        source=source,
    )


def _fill_ffn(exponents, goal: int, costs: Costs, query: list[int], dropped: list[int]):
    """FFN rows per layer proportional to FFN_BASE**exponent x width, meeting `goal`."""
    count = len(costs.layer)
    kept = [i for i in range(count) if i not in dropped]
    caps = {i: int(MAX_FFN_RATIO * costs.widths[i]) for i in kept}
    weights = {i: FFN_BASE ** float(exponents[i]) * costs.widths[i] for i in kept}

    def rows_at(scale: float) -> list[int]:
        rows = [0] * count
        for i in kept:
            rows[i] = min(caps[i], math.floor(scale * weights[i]))
        return rows

    def removed(rows: list[int]) -> int:
        return costs.removed(rows, query, 0, dropped)

    full = [caps.get(i, 0) for i in range(count)]
    if removed(full) < goal:
        raise PruneNetError(
            f"The budget of {goal:,} parameters cannot be met: the kept layers' FFN rows (at most "
            f"{MAX_FFN_RATIO:.0%} of each) remove only {removed(full):,}; lower the budget."
        )
    if removed([0] * count) >= goal:
        return [0] * count
    # The largest scale whose floor still falls short of the goal, by bisection (removed()
    # grows with the scale); then rows are added one at a time by largest remainder.
    low, high = 0.0, 1.0 / min(weights.values())
    while removed(rows_at(high)) < goal:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if removed(rows_at(middle)) < goal else (low, middle)
    rows = rows_at(low)
    remainders = sorted(kept, key=lambda i: (-(low * weights[i] - rows[i]), i))
    while removed(rows) < goal:
        for i in remainders:
            if rows[i] < caps[i]:
                rows[i] += 1
                if removed(rows) >= goal:
                    break
        else:  # every layer at its cap: unreachable, already refused above
            break
    return rows


def _heads_for(level: float, group_size: int) -> int:
    return min(group_size - 1, math.floor(max(level, 0.0) * group_size))


def check_base(base: str) -> str:
    """`base` if it is one of `BASES`, else a PruneNetError naming them.

    :param base: what a policy's actions are relative to.
    """
    if base not in BASES:
        raise PruneNetError(f"Unknown strategy base {base!r}; choose {' or '.join(BASES)}.")
    return base


def observation_size(base: str = "uniform") -> int:
    """Length of one strategy observation (`observe`).

    :param base: the policy's base (`BASES`); the ramp base adds its slope.
    """
    extra = len(BASE_CONTEXT) if check_base(base) == "ramp" else 0
    return len(DESCRIPTORS) + len(CONTEXT) + extra


def observe(
    context: StrategyContext,
    budget: float,
    actions: np.ndarray,
    step: int,
    ramp_slope: float | None = None,
) -> np.ndarray:
    """What the strategy policy sees before acting on layer `step`: its descriptors and
    `CONTEXT` (the request and the proposals so far); the environment and `propose` share it.

    :param context: the model's `StrategyContext` (with descriptors).
    :param budget: the request: fraction of parameters to remove.
    :param actions: layers x 3 proposals; rows before `step` are read.
    :param step: the layer about to be decided.
    :param ramp_slope: the base ramp's slope, for a policy on the ramp base (appended).
    """
    costs, so_far = context.costs, actions[:step]
    goal = max(budget * costs.dense, 1.0)
    drops = [i for i in range(step) if so_far[i, 2] > DROP_LEVEL]
    drop_share = sum(costs.layer[i] for i in drops) / goal
    head_share = 0.0
    if costs.heads is not None:
        for i in range(step):
            shape = costs.shapes[i]
            heads = _heads_for(so_far[i, 1], shape.group_size)
            head_share += heads * shape.num_kv_heads * costs.heads[i].per_query_head / goal
    mean_log_weight = float(so_far[:, 0].mean()) * math.log(FFN_BASE) if step else 0.0
    extra = [budget, step / context.layer_count, mean_log_weight, drop_share, head_share]
    if ramp_slope is not None:
        extra.append(ramp_slope)
    return np.concatenate([context.descriptors[step], extra]).astype(np.float32)


def on_base(proposals: np.ndarray, base: Strategy | None) -> np.ndarray:
    """The actions `realise` gets from a policy's proposals: the proposals themselves on the
    uniform base (`base` None), or on a ramp base its FFN exponents plus `RESIDUAL_SCALE` x the
    proposed FFN column (heads and drops are the proposals').

    :param proposals: layers x 3 policy actions in [-1, 1].
    :param base: the request's best ramp (`StrategyContext.best_ramp`), or None.
    """
    actions = np.array(proposals, dtype=np.float64, copy=True)
    if base is not None:
        ramp = depth_ramp_actions(len(actions), base.extra["slope"])
        actions[:, 0] = ramp[:, 0] + RESIDUAL_SCALE * actions[:, 0]
    return actions


def uniform_actions(layer_count: int) -> np.ndarray:
    """The all-zero actions: the same share of every layer's FFN, no heads, no layer.

    :param layer_count: decoder layers of the model.
    """
    return np.zeros((layer_count, 3))


def depth_ramp_actions(layer_count: int, slope: float) -> np.ndarray:
    """The hand-made rule the strategy policy is compared with: FFN exponents rising linearly
    with depth from -slope (first layer) to +slope (last), nothing else cut. slope 0 is uniform;
    slope 0.25 takes about 1.4x the rows from the last layer as from the first.

    :param layer_count: decoder layers of the model.
    :param slope: exponent at the last layer (its negative at the first), in [-1, 1].
    """
    actions = np.zeros((layer_count, 3))
    actions[:, 0] = slope * np.linspace(-1.0, 1.0, layer_count)
    return actions


class StrategyContext:
    """What measuring and describing strategies on one dense model needs, computed once.

    :param model: the dense model (never modified).
    :param tokens: its own text (sequences x length ids): the last `KL_SEQUENCES` (at most a
        quarter) are held out for the KL, the rest give the FFN and head scores and the
        block influence.
    :param refit_biases: count the biases a refit adds in the parameter arithmetic.
    :param describe: compute the per-layer descriptors (two masked passes per layer).
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        refit_biases: bool = False,
        describe: bool = True,
    ) -> None:
        self.model = model
        self.costs = Costs(model, refit_biases)
        fit, self.kl_tokens = split_held_out(tokens)
        self.ffn_scores = ffn_activation_scores(model, fit)
        heads_ok = self.costs.shapes is not None and head_removal_blocker(model.config) is None
        self.head_rank = head_ranks(model, fit) if heads_ok else None
        # The evaluation's own KL code on the held-out sequences (as windows without BOS: each
        # already starts with the start token), its dense logits cached once.
        digest = hashlib.sha256(self.kl_tokens.numpy().tobytes()).hexdigest()
        self.windows = TokenWindows("selfgen-held-out", self.kl_tokens, None, len(self.kl_tokens),
                                    self.kl_tokens.numel(), digest)  # fmt: skip
        self.reference = ReferenceCache()
        kl_and_perplexity(model, model, self.windows, cache=self.reference)
        self.influence = block_influence(model, fit)
        self.evaluations = 0
        self.descriptors = self._describe() if describe else None
        self._ramps: dict[float, Strategy] = {}

    def best_ramp(self, target: float) -> Strategy:
        """`ramp_search` for `target`, measured once per budget (a ramp-based policy's base:
        training draws budgets on a grid, so each is paid for once).

        :param target: fraction of all parameters to remove.
        """
        if target not in self._ramps:
            self._ramps[target] = ramp_search(self, target)
        return self._ramps[target]

    @property
    def layer_count(self) -> int:
        return len(self.costs.layer)

    def kl(self, strategy: Strategy) -> float:
        """KL(dense || dense model with `strategy` masked in) per held-out token.

        :param strategy: from `realise`.
        """
        self.evaluations += 1
        return self._masked_kl(strategy.trial())

    def _masked_kl(self, trial: dict) -> float:
        with masked(self.model, trial, self.ffn_scores, self.head_rank, self.costs.shapes):
            kl, _ = kl_and_perplexity(self.model, self.model, self.windows, cache=self.reference)
        return kl.mean_kl

    def _describe(self) -> np.ndarray:
        count = self.layer_count
        out = np.zeros((count, len(DESCRIPTORS)), dtype=np.float32)
        bar = tqdm(total=2 * count, desc="layer descriptors (masked KL)", unit="pass", leave=False)
        for index in range(count):
            skip = self._masked_kl({"rows": 0, "query": 0, "groups": 0, "dropped": [index]})
            bar.update(1)
            rows = [0] * count
            rows[index] = int(PROBE_RATIO * self.costs.widths[index])
            ffn = self._masked_kl({"rows": rows, "query": 0, "groups": 0, "dropped": []})
            bar.update(1)
            scores = torch.sort(self.ffn_scores[index].float()).values
            low = scores[: rows[index]].sum() / scores.sum().clamp(min=1e-12)
            head_low = 0.0
            if self.head_rank is not None:
                shape = self.costs.shapes[index]
                grouped = self.head_rank[index].float().reshape(shape.num_kv_heads, -1)
                head_low = float(grouped.min(dim=1).values.sum() / grouped.sum().clamp(min=1e-12))
            per_layer = self.costs.layer[index]
            ffn_params = self.costs.per_row[index] * self.costs.widths[index]
            out[index] = [
                index / max(count - 1, 1),
                per_layer / self.costs.dense,
                ffn_params / per_layer,
                float(self.influence[index]),
                math.log10(max(skip, 1e-8)),
                math.log10(max(ffn, 1e-8)),
                float(low),
                head_low,
            ]
        bar.close()
        return out


def random_search(
    context: StrategyContext,
    target: float,
    evaluations: int,
    structures: Sequence[str] = ("ffn",),
    seed: int = 0,
    spread: float = 0.5,
    center: np.ndarray | None = None,
) -> Strategy:
    """The search baseline: the best of `evaluations` strategies by masked KL, the first one
    `center` (default uniform), the others random actions around it (normal, `spread` standard
    deviation).

    :param context: the model's `StrategyContext`.
    :param target: fraction of all parameters to remove.
    :param evaluations: strategies measured (KL passes), at least 1.
    :param structures: which structures the actions may use.
    :param seed: random seed (same seed, same strategy).
    :param spread: standard deviation of the random actions.
    :param center: layers x 3 actions the search starts from and varies (e.g. the best ramp's).
    """
    if evaluations < 1:
        raise PruneNetError(f"random_search needs at least 1 evaluation, got {evaluations}.")
    generator = np.random.default_rng(seed)
    start = uniform_actions(context.layer_count) if center is None else np.asarray(center)
    best = None
    for trial in tqdm(range(evaluations), desc=f"random strategies at {target:g}", unit="KL",
                      leave=False):  # fmt: skip
        actions = start
        if trial:
            actions = start + generator.normal(0.0, spread, size=start.shape)
        strategy = realise(actions, target, context.costs, structures, source="search")
        strategy.kl = context.kl(strategy)
        if best is None or strategy.kl < best.kl:
            best = strategy
    best.extra = {"evaluations": evaluations, "seed": seed, "spread": spread,
                  "centered": center is not None}  # fmt: skip
    return best


RAMP_SLOPES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def ramp_search(
    context: StrategyContext, target: float, slopes: Sequence[float] = RAMP_SLOPES
) -> Strategy:
    """The hand-made rule with its one knob set per request: the depth ramp
    (`depth_ramp_actions`) whose slope gives the least masked KL, FFN rows only. Slope 0 (the
    uniform cut) is among the candidates, so it is never worse than uniform on that KL.

    :param context: the model's `StrategyContext`.
    :param target: fraction of all parameters to remove.
    :param slopes: the slopes tried (one KL pass each).
    """
    best = None
    for slope in tqdm(slopes, desc=f"depth-ramp slopes at {target:g}", unit="KL", leave=False):
        actions = depth_ramp_actions(context.layer_count, slope)
        strategy = realise(actions, target, context.costs, ("ffn",), source="ramp")
        strategy.kl = context.kl(strategy)
        if best is None or strategy.kl < best.kl:
            best = strategy
            best.extra = {"slope": slope, "slopes": list(slopes)}
    return best


def held_out_sequences(count: int) -> int:
    """How many of `count` sequences a strategy's KL is measured on (the last ones): at most
    `KL_SEQUENCES`, at most a quarter, at least one.

    :param count: sequences in the strategy's text.
    """
    return min(KL_SEQUENCES, max(1, count // 4))


def split_held_out(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokens` split into the sequences a strategy's scores read and the last
    `held_out_sequences` ones its KL is measured on.

    :param tokens: sequences x length ids (e.g. `strategy_tokens` of the run's text).
    """
    held = held_out_sequences(tokens.shape[0])
    return tokens[: tokens.shape[0] - held], tokens[tokens.shape[0] - held :]


def strategy_text_shape(sequences: int, length: int) -> tuple[int, int]:
    """The sequences x length strategies read of a run's text of `sequences` x `length` tokens.

    :param sequences: the run's text's sequences.
    :param length: its tokens per sequence.
    """
    return min(STRATEGY_SEQUENCES, sequences), min(STRATEGY_LENGTH, length)


def strategy_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """The part of the run's own text strategies read: `STRATEGY_SEQUENCES` sequences cut to
    their first `STRATEGY_LENGTH` tokens, the last `KL_SEQUENCES` of them the text's last
    sequences, so the strategy's held-out KL reads the sequences the cut holds out as well
    (`prunenet.analysis.sequential`), never those its refit is fitted on.

    :param tokens: the run's text (sequences x length ids, `analysis_text`).
    """
    count, length = strategy_text_shape(*tokens.shape)
    held = held_out_sequences(count)  # the same rule `StrategyContext` splits by
    rows = torch.cat([tokens[: count - held], tokens[tokens.shape[0] - held :]])
    return rows[:, :length].contiguous()


def strategy_context(
    model: nn.Module, tokens: torch.Tensor, refit_biases: bool = False, describe: bool = True
) -> StrategyContext:
    """The model's `StrategyContext` on part of the run's own text (`strategy_tokens`), so one
    text serves the strategy, the cut and the refit.

    :param model: the dense model.
    :param tokens: the run's text (`prunenet.analysis.sequential.analysis_text`).
    :param refit_biases: count the biases a refit adds.
    :param describe: compute the layer descriptors (only the policy reads them: 2 masked passes
        per layer, minutes on a CPU).
    """
    return StrategyContext(model, strategy_tokens(tokens), refit_biases, describe)
