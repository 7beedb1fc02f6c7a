"""How much of each structure: one parameter budget split between FFN rows, heads and layers.

`prunenet prune --remove-params 0.2 --structures ffn,heads,layers` asks for 20% fewer
parameters and lets PruneNet decide where they come from. The rule here is simple, data-free
and documented (the strategy-policy issue learns a better one): greedy on measured KL per
parameter. Starting from the dense model, each step tries one more unit of every allowed
structure,

- `ffn`: `FFN_STEP` more of every layer's FFN rows (rows ranked by activation rms x output
  column norm, the `selfgen` heuristic);
- `heads`: one more query head from every KV group of every layer, or one more whole KV group
  (heads ranked by their output energy, `prunenet.analysis.head_scores`);
- `layers`: the next layer by block influence (`prunenet.analysis.influence`),

measures KL(dense || trial) on the model's own held-out text with the trial applied as masks
(zeroed FFN rows and head outputs, skipped layers: the dense weights are never touched), and
keeps the step with the least KL added per parameter removed (a step past the budget only when
no smaller one is left, and then only FFN rows where they are allowed), until the budget is
reached. The FFN then absorbs the rounding: its
rows are set so the total is met to within one FFN row per layer (or, without `ffn`, to within
one step of the last structure). Parameters a refit adds (Llama's FFN biases) are counted.

Heads and layers are counted uniformly across layers (the same heads removed in every layer),
so a result without per-layer FFN widths loads with plain `from_pretrained`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from prunenet.allocation.budget import _parameters_per_row
from prunenet.allocation.trials import masked, mean_kl, reference_log_probs
from prunenet.analysis.influence import block_influence
from prunenet.analysis.unit_ranks import ffn_activation_scores, head_ranks
from prunenet.core.arch import adapter_for, decoder_layers, head_removal_blocker
from prunenet.core.compress import count_parameters
from prunenet.core.config_fields import ffn_widths, head_shapes
from prunenet.core.depth import layer_parameters
from prunenet.core.heads import head_costs
from prunenet.core.surgery import added_bias_parameters
from prunenet.errors import PruneNetError

STRUCTURES = ("ffn", "heads", "layers")
FFN_STEP = 0.05  # share of every layer's FFN rows one greedy step removes
MAX_FFN_RATIO = 0.9  # the greedy never takes more of a layer's FFN than this
KL_SEQUENCES = 16  # held-out self-generated sequences the greedy measures KL on
# The dense log-probabilities are kept for the whole greedy: at most this many floats (1 GiB),
# so a 262k-vocabulary model (Gemma 3) measures on fewer sequences.
REFERENCE_FLOATS = 2**28


@dataclass
class StructureSplit:
    """How one parameter budget is split between structures.

    :param target: fraction of all parameters to remove.
    :param ffn_rows: FFN rows removed from every kept layer.
    :param query_heads: query heads removed from every KV group of every kept layer.
    :param kv_groups: whole KV groups (a KV head with its query heads) removed per kept layer.
    :param layers: decoder layers dropped (dense indices).
    :param params_dense: parameters of the dense model.
    :param params_removed: parameters the split removes (arithmetic, before any refit bias).
    :param steps: the greedy's log: structure chosen, parameters removed so far, KL so far.
    :param head_scores: per layer, the query-head scores the trials used (the cut keeps the
        same heads); not serialised.
    """

    target: float
    ffn_rows: int = 0
    query_heads: int = 0
    kv_groups: int = 0
    layers: list[int] = field(default_factory=list)
    params_dense: int = 0
    params_removed: int = 0
    steps: list[dict] = field(default_factory=list)
    head_scores: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def removed_fraction(self) -> float:
        return self.params_removed / self.params_dense if self.params_dense else 0.0

    def ffn_ratio(self, config) -> float:
        """The planner's ratio that removes `ffn_rows` from every layer of a model of `config`
        (the model the FFN rows are cut from): the rows over the narrowest layer's width. Every
        route computes it here, so the same budget cuts the same rows on each.

        :param config: that model's config.
        """
        return self.ffn_rows / min(ffn_widths(config))

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "head_scores"}
        return {**data, "removed_fraction": self.removed_fraction}


def parse_structures(text: str, config=None) -> tuple[str, ...]:
    """`ffn,heads,layers` (any subset, any order) as a tuple in `STRUCTURES` order.

    :param text: comma-separated structure names.
    :param config: the model's config: `heads` is refused for an architecture whose heads
        cannot be removed (the message says why).
    """
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(names) - set(STRUCTURES))
    if unknown or not names:
        raise PruneNetError(
            f"Unknown structure(s) {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(STRUCTURES)} (comma-separated, e.g. ffn,heads)."
        )
    if config is not None and "heads" in names:
        blocker = head_removal_blocker(config)
        if blocker:
            raise PruneNetError(
                f"--structures heads: {config.model_type} heads cannot be removed: {blocker}. "
                "Use ffn and/or layers."
            )
    return tuple(name for name in STRUCTURES if name in names)


class Costs:
    """Exact parameter arithmetic of a split (or a per-layer strategy) on one dense model.

    :param model: the dense model.
    :param refit_biases: count the FFN biases an lsq/bias refit adds (`added_bias_parameters`).
    """

    def __init__(self, model: nn.Module, refit_biases: bool = False) -> None:
        adapter = adapter_for(model.config)
        # An lsq/bias refit of a Llama-style model adds FFN biases the budget must pay for.
        self.bias_per_row, self.bias_per_layer = (
            added_bias_parameters(model) if refit_biases else (0, 0)
        )
        layers = decoder_layers(model)
        self.dense = count_parameters(model)
        self.widths = ffn_widths(model.config)
        self.layer = [layer_parameters(model, i) for i in range(len(layers))]
        self.per_row = [_parameters_per_row(layer, adapter) for layer in layers]
        self.shapes = head_shapes(model.config) if adapter.attention is not None else None
        self.heads = (
            [
                head_costs(layer, adapter, shape)
                for layer, shape in zip(layers, self.shapes, strict=True)
            ]
            if self.shapes is not None and head_removal_blocker(model.config) is None
            else None
        )

    def removed(
        self,
        rows: int | Sequence[int],
        query: int | Sequence[int],
        groups: int,
        dropped: Sequence[int],
    ) -> int:
        """Parameters removed; `rows` and `query` are one count for every layer or one per
        (dense) layer."""
        total = sum(self.layer[i] for i in dropped)
        for i in range(len(self.layer)):
            if i in dropped:
                continue
            layer_rows = rows[i] if isinstance(rows, (list, tuple)) else rows
            layer_query = query[i] if isinstance(query, (list, tuple)) else query
            total += layer_rows * self.per_row[i]
            if layer_rows:  # the refit runs (and adds its biases) only where rows go
                kept_rows = self.widths[i] - layer_rows
                total -= self.bias_per_row * kept_rows + self.bias_per_layer
            if self.heads is not None and (layer_query or groups):
                shape, cost = self.shapes[i], self.heads[i]
                kept_queries = (shape.num_kv_heads - groups) * (shape.group_size - layer_query)
                total += (shape.num_heads - kept_queries) * cost.per_query_head
                total += groups * cost.per_kv_head
        return total


def reachable_parameters(costs: Costs, structures: Sequence[str]) -> int:
    """The most parameters `structures` can remove: `MAX_FFN_RATIO` of every layer's FFN rows,
    every head but one query head in one KV group per layer, every layer but the least costly.

    :param costs: `Costs` of the dense model.
    :param structures: a subset of `STRUCTURES`.
    """
    most = {"rows": 0, "query": 0, "groups": 0, "dropped": []}
    if "ffn" in structures:
        most["rows"] = int(MAX_FFN_RATIO * min(costs.widths))
    if "heads" in structures and costs.heads is not None:
        most["query"] = min(s.group_size for s in costs.shapes) - 1
        most["groups"] = min(s.num_kv_heads for s in costs.shapes) - 1
    if "layers" in structures:
        # The least costly layer stays (any one must).
        keep = min(range(len(costs.layer)), key=costs.layer.__getitem__)
        most["dropped"] = [i for i in range(len(costs.layer)) if i != keep]
    return costs.removed(**most)


def check_budget(model: nn.Module, target: float, structures: Sequence[str]) -> None:
    """Refuse a budget `structures` cannot meet on `model` (before any text is generated):
    at most `MAX_FFN_RATIO` of the FFN rows, every head but one query head in one KV group per
    layer, every layer but one.

    :param model: the dense model.
    :param target: fraction of all parameters to remove.
    :param structures: a subset of `STRUCTURES`.
    """
    if not 0 < target < 1:
        raise PruneNetError(f"--remove-params must be a fraction in (0, 1), got {target}.")
    costs = Costs(model)
    if "heads" in structures and costs.heads is None:
        raise PruneNetError(f"{model.config.model_type} heads cannot be removed.")
    reachable = reachable_parameters(costs, structures)
    if reachable < target * costs.dense:
        raise PruneNetError(
            f"--remove-params {target} asks for {target:.1%} of the parameters, but "
            f"{', '.join(structures)} can remove at most {reachable / costs.dense:.1%} of this "
            f"model ({_limits(structures)}; embeddings are never cut). Lower the budget or "
            "allow more --structures."
        )


def _limits(structures: Sequence[str]) -> str:
    limits = {"ffn": f"at most {MAX_FFN_RATIO:.0%} of each layer's FFN rows",
              "heads": "every layer keeps at least one head",
              "layers": "one layer stays"}  # fmt: skip
    return ", ".join(limits[name] for name in structures)


def split_budget(
    model: nn.Module,
    target: float,
    structures: Sequence[str],
    tokens: torch.Tensor,
    ffn_scores: Sequence[torch.Tensor] | None = None,
    refit_biases: bool = False,
) -> StructureSplit:
    """Split `target` (fraction of all parameters) between `structures` by greedy KL per
    parameter (module docstring). The model is not modified.

    :param model: the dense model.
    :param target: fraction of all parameters to remove, in (0, 1).
    :param structures: a subset of `STRUCTURES` (`parse_structures`).
    :param tokens: the model's own text (sequences x length ids); the KL is measured on its last
        `KL_SEQUENCES` sequences (the analysis's held-out part), the scores on the rest.
    :param ffn_scores: per-layer FFN row scores for the trials (higher = keep); None ranks by
        activation rms x output column norm on the same text.
    :param refit_biases: the FFN refit will add biases (`added_bias_parameters`): count them.
    """
    if tuple(structures) == ("ffn",):
        return ffn_split(model, target, refit_biases)
    check_budget(model, target, structures)
    costs = Costs(model, refit_biases)
    layer_count = len(costs.layer)
    goal = int(round(target * costs.dense))
    vocab = model.get_output_embeddings().weight.shape[0]
    fits = max(1, REFERENCE_FLOATS // (tokens.shape[1] * vocab))
    held = min(KL_SEQUENCES, fits, max(1, tokens.shape[0] // 4))
    fit_tokens, kl_tokens = tokens[:-held], tokens[-held:]
    search = tuple(structures) != ("ffn",)  # FFN rows alone: `_fit_rows` meets the budget
    if ffn_scores is None and search and "ffn" in structures:
        ffn_scores = ffn_activation_scores(model, fit_tokens)
    head_rank = head_ranks(model, fit_tokens) if "heads" in structures else None
    layer_rank = (
        torch.argsort(block_influence(model, fit_tokens)).tolist() if "layers" in structures else []
    )
    split = StructureSplit(target=target, params_dense=costs.dense, head_scores=head_rank)
    state = _nothing_removed()
    step_rows = max(1, round(FFN_STEP * min(costs.widths)))
    reference = reference_log_probs(model, kl_tokens) if search else []
    kl_now = 0.0
    bar = tqdm(total=goal, desc="splitting the budget (KL per parameter)", unit="param",
               unit_scale=True, leave=False)  # fmt: skip
    removed_now = 0
    while removed_now < goal and search:
        options = _options(state, structures, costs, step_rows, layer_rank, layer_count)
        if not options:
            break
        best = None
        sizes = [costs.removed(**trial) for _, trial in options]
        # A step past the goal only when nothing smaller is left: the FFN fills the rest
        # exactly, and one big step (a layer of a small model) could overshoot by a lot.
        within = any(removed_now < size <= goal for size in sizes)
        for (name, trial), removed in zip(options, sizes, strict=True):
            if removed <= removed_now or (within and removed > goal):
                continue
            if removed > goal and name != "ffn" and "ffn" in structures:
                # Past the budget only FFN rows may go, since `_fit_rows` trims them exactly; a
                # whole KV group taken as the last step doubled SmolLM2's perplexity at 30%.
                continue
            with masked(model, trial, ffn_scores, head_rank, costs.shapes):
                kl = mean_kl(model, kl_tokens, reference)
            rate = max(kl - kl_now, 0.0) / (removed - removed_now)
            if best is None or rate < best[0]:
                best = (rate, name, trial, removed, kl)
        if best is None:
            break
        _, name, state, new_removed, kl_now = best
        bar.update(new_removed - removed_now)
        removed_now = new_removed
        split.steps.append({"structure": name, "params_removed": removed_now, "kl": kl_now})
    bar.close()
    if "ffn" in structures:
        state = _fit_rows(state, costs, goal)
    split.ffn_rows, split.query_heads = state["rows"], state["query"]
    split.kv_groups, split.layers = state["groups"], sorted(state["dropped"])
    split.params_removed = costs.removed(**state)
    return split


def ffn_split(model: nn.Module, target: float, refit_biases: bool = False) -> StructureSplit:
    """`split_budget` for FFN rows alone: the fewest rows per layer that remove `target` of
    the parameters. Arithmetic on parameter counts only (no text, no forward pass), so a model
    whose weights are on the meta device (the layerwise and stream routes) gets it too.

    :param model: the dense model (its weights may be on the meta device).
    :param target: fraction of all parameters to remove, in (0, 1).
    :param refit_biases: the FFN refit will add biases (`added_bias_parameters`): count them.
    """
    check_budget(model, target, ("ffn",))
    costs = Costs(model, refit_biases)
    state = _fit_rows(_nothing_removed(), costs, int(round(target * costs.dense)))
    return StructureSplit(target=target, ffn_rows=state["rows"], params_dense=costs.dense,
                          params_removed=costs.removed(**state))  # fmt: skip


def _nothing_removed() -> dict:
    """The split state before any step: no FFN rows, query heads, KV groups or layers."""
    return {"rows": 0, "query": 0, "groups": 0, "dropped": []}


def _options(state, structures, costs, step_rows, layer_rank, layer_count):
    """The next unit of every allowed structure, as (name, trial state)."""
    options = []
    if "ffn" in structures:
        rows, most = state["rows"] + step_rows, MAX_FFN_RATIO * min(costs.widths)
        # The first rows may not pay for the biases a refit adds (tiny models): take more.
        while rows + step_rows <= most and costs.removed(
            **{**state, "rows": rows}
        ) <= costs.removed(**state):
            rows += step_rows
        if rows <= most:
            options.append(("ffn", {**state, "rows": rows}))
    if "heads" in structures:
        shapes = [s for i, s in enumerate(costs.shapes) if i not in state["dropped"]]
        if all(s.group_size - state["query"] > 1 for s in shapes):
            options.append(("query heads", {**state, "query": state["query"] + 1}))
        if all(s.num_kv_heads - state["groups"] > 1 for s in shapes):
            options.append(("kv groups", {**state, "groups": state["groups"] + 1}))
    if "layers" in structures and len(state["dropped"]) < layer_count - 1:
        following = [i for i in layer_rank if i not in state["dropped"]][0]
        options.append(("layer", {**state, "dropped": [*state["dropped"], following]}))
    return options


def _fit_rows(state: dict, costs: Costs, goal: int) -> dict:
    """The fewest FFN rows per kept layer that meet the goal (all but one row at most)."""
    most = min(costs.widths) - 1

    def removed(rows: int) -> int:
        return costs.removed(rows, state["query"], state["groups"], state["dropped"])

    kept = [i for i in range(len(costs.layer)) if i not in state["dropped"]]
    per_step = sum(costs.per_row[i] + costs.bias_per_row for i in kept)
    rows = min(most, max(0, math.ceil((goal - removed(0)) / per_step))) if per_step else 0
    # The estimate ignores the refit's per-layer bias: step to the exact answer.
    while rows < most and removed(rows) < goal:
        rows += 1
    while rows > 0 and removed(rows - 1) >= goal:
        rows -= 1
    return {**state, "rows": rows}
