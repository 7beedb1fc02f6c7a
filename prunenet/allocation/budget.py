"""How many FFN rows to remove in each layer, given one global budget.

Why per-layer allocation: on SmolLM2-135M, removing 30% of layer 0's FFN rows alone multiplies
perplexity by up to ~200 while most other layers tolerate 30% at x1.03-1.25, so where the rows
come from matters more than which rows are chosen (issue 4, "Quality first").

The allocator is independent of how damage is measured. Each layer gets a cost curve c_l(k):
the damage of removing k of its rows (a proxy such as a spectral or reconstruction error, or a
measured perplexity increase), given as a `CostGrid` (values at a few ratios, interpolated), an
array over k, or a callable of k. `allocate_rows` then picks row counts k_l that

- remove exactly the budget in total (an integer number of rows, not a rounded ratio),
- stay within each layer's cap and floor (default: never more than 60% of one layer),
- minimise sum_l c_l(k_l): greedily by marginal cost c_l(k + 1) - c_l(k), which is optimal
  when every curve is convex (non-decreasing marginal cost) and a sound heuristic otherwise.
  Ties go to the lowest layer index, so the result is deterministic.

`uniform_allocation` is the trivial case: the same ratio in every layer, with the rounding
remainder spread over the first layers so that the total is still exact. Hand the result to
`prunenet.core.compress.prune_model(..., layer_keep=keep_counts(widths, removed))`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.surgery import ffn_modules, ffn_weights
from prunenet.errors import PruneNetError

DEFAULT_MAX_RATIO = 0.6


@dataclass(frozen=True)
class CostGrid:
    """Damage of one layer measured at a few ratios, linearly interpolated in between.

    :param ratios: increasing fractions of the layer's rows removed, in [0, 1]. Costs are damage
        relative to the unpruned layer, so (0, 0) is implied when the grid starts above 0.
    :param costs: damage at each ratio (any scale shared by all layers: only differences
        between layers' marginal costs matter).
    """

    ratios: Sequence[float]
    costs: Sequence[float]

    def table(self, width: int, max_rows: int) -> np.ndarray:
        """Cost of removing k = 0..max_rows rows of a layer of `width` rows."""
        ratios = np.asarray(self.ratios, dtype=np.float64)
        costs = np.asarray(self.costs, dtype=np.float64)
        if ratios.ndim != 1 or ratios.shape != costs.shape or ratios.size == 0:
            raise PruneNetError("A CostGrid needs as many costs as ratios (at least one).")
        if np.any(np.diff(ratios) <= 0) or ratios[0] < 0 or ratios[-1] > 1:
            raise PruneNetError(f"CostGrid ratios must increase within [0, 1]; got {ratios}.")
        if ratios[0] > 0:
            ratios, costs = np.concatenate([[0.0], ratios]), np.concatenate([[0.0], costs])
        if max_rows / width > ratios[-1] + 1e-12:
            raise PruneNetError(
                f"The cost grid stops at ratio {ratios[-1]:g} but the cap allows removing "
                f"{max_rows / width:.3f} of this layer; measure the cost up to the cap or lower "
                "max_ratio (the allocator does not extrapolate damage)."
            )
        return np.interp(np.arange(max_rows + 1) / width, ratios, costs)


CostCurve = CostGrid | Callable[[int], float] | Sequence[float] | np.ndarray | torch.Tensor
Ratios = float | Sequence[float]


def rows_for_parameter_target(model: nn.Module, target_params: int) -> int:
    """Fewest FFN rows to remove so the model has at most `target_params` parameters.

    One FFN row costs the same in every layer (its input-projection rows, their biases and one
    output column), so a parameter target converts to one global row budget.
    """
    adapter = adapter_for(model.config)
    per_row = {_parameters_per_row(layer, adapter) for layer in decoder_layers(model)}
    if len(per_row) != 1:
        raise PruneNetError(f"FFN rows cost different parameter counts per layer: {per_row}.")
    excess = sum(p.numel() for p in model.parameters()) - int(target_params)
    return max(0, math.ceil(excess / per_row.pop()))


def allocate_rows(
    cost_curves: Sequence[CostCurve],
    widths: Sequence[int],
    total_rows: int,
    max_ratio: Ratios = DEFAULT_MAX_RATIO,
    min_ratio: Ratios = 0.0,
) -> list[int]:
    """Rows to remove per layer: exactly `total_rows` in total, least total cost, within caps.

    :param cost_curves: one cost curve per layer (`CostGrid`, array over k, or callable of k);
        an array must cover k = 0 .. the layer's cap.
    :param widths: each layer's current FFN width (rows).
    :param total_rows: rows to remove over all layers (see `rows_for_ratio`,
        `rows_for_parameter_target`).
    :param max_ratio: cap on the fraction removed per layer, one value or one per layer (never
        more than width - 1 rows: a layer keeps at least one row).
    :param min_ratio: floor on the fraction removed per layer, one value or one per layer.
    :return: rows removed per layer, in layer order.
    """
    floors, caps = _limits(widths, total_rows, max_ratio, min_ratio)
    if len(cost_curves) != len(widths):
        raise PruneNetError(f"Got {len(cost_curves)} cost curves for {len(widths)} layers.")
    tables = [
        _cost_table(curve, width, cap, index)
        for index, (curve, width, cap) in enumerate(zip(cost_curves, widths, caps, strict=True))
    ]
    removed = list(floors)
    heap = [
        (float(table[k + 1] - table[k]), index)
        for index, (table, k, cap) in enumerate(zip(tables, removed, caps, strict=True))
        if k < cap
    ]
    heapq.heapify(heap)
    for _ in range(total_rows - sum(floors)):
        _, index = heapq.heappop(heap)
        removed[index] += 1
        k = removed[index]
        if k < caps[index]:
            heapq.heappush(heap, (float(tables[index][k + 1] - tables[index][k]), index))
    return removed


def uniform_allocation(
    widths: Sequence[int],
    total_rows: int,
    max_ratio: Ratios = DEFAULT_MAX_RATIO,
    min_ratio: Ratios = 0.0,
) -> list[int]:
    """The same ratio in every layer, with an exact total.

    Each layer gets its proportional share rounded down; the leftover rows go one each to the
    layers with the largest rounding remainder (ties: lowest layer index). With caps or floors
    that bind, the binding layers are fixed and the rest share the remainder the same way.
    """
    floors, caps = _limits(widths, total_rows, max_ratio, min_ratio)
    removed = list(floors)
    free = [i for i in range(len(widths)) if floors[i] < caps[i]]
    remaining = total_rows - sum(floors)
    while remaining > 0:
        # Water-filling: share `remaining` in proportion to width among unsaturated layers.
        share_of = {i: remaining * widths[i] for i in free}
        total_width = sum(widths[i] for i in free)
        extra = {i: min(share_of[i] // total_width, caps[i] - removed[i]) for i in free}
        leftover = remaining - sum(extra.values())
        order = sorted(free, key=lambda i: (-(share_of[i] % total_width), i))
        for i in order:
            if leftover == 0:
                break
            if removed[i] + extra[i] < caps[i]:
                extra[i] += 1
                leftover -= 1
        for i in free:
            removed[i] += extra[i]
        remaining = total_rows - sum(removed)
        free = [i for i in free if removed[i] < caps[i]]
    return removed


def keep_counts(widths: Sequence[int], removed: Sequence[int]) -> list[int]:
    """Rows kept per layer, as `prune_model(layer_keep=...)` takes them."""
    return [int(width) - int(k) for width, k in zip(widths, removed, strict=True)]


def _limits(
    widths: Sequence[int], total_rows: int, max_ratio: Ratios, min_ratio: Ratios
) -> tuple[list[int], list[int]]:
    """Per-layer [floor, cap] in rows, and a clear error when the budget cannot fit them."""
    widths = [int(width) for width in widths]
    if not widths or min(widths) < 1:
        raise PruneNetError(f"Need at least one layer and positive widths; got {widths}.")
    if isinstance(total_rows, bool) or int(total_rows) != total_rows or total_rows < 0:
        raise PruneNetError(f"The budget must be a whole number of rows >= 0; got {total_rows!r}.")
    highs = _per_layer(max_ratio, len(widths), "max_ratio")
    lows = _per_layer(min_ratio, len(widths), "min_ratio")
    caps, floors = [], []
    for index, (width, high, low) in enumerate(zip(widths, highs, lows, strict=True)):
        if not 0.0 <= low <= high <= 1.0:
            raise PruneNetError(
                f"Layer {index}: need 0 <= min_ratio <= max_ratio <= 1; got {low}, {high}."
            )
        # The small tolerance keeps 0.3 * 10 at 3 rows instead of 2.9999999999999996 -> 2.
        caps.append(min(math.floor(high * width + 1e-9), width - 1))
        floors.append(math.ceil(low * width - 1e-9))
        if floors[-1] > caps[-1]:
            raise PruneNetError(
                f"Layer {index}: the floor ({floors[-1]} rows) exceeds the cap ({caps[-1]} rows)."
            )
    total_width = sum(widths)
    if total_rows > sum(caps):
        raise PruneNetError(
            f"Cannot remove {total_rows} of {total_width} FFN rows "
            f"({total_rows / total_width:.1%}): the per-layer caps (max_ratio={max_ratio}) allow "
            f"at most {sum(caps)} ({sum(caps) / total_width:.1%}). Lower the budget or raise "
            "max_ratio."
        )
    if total_rows < sum(floors):
        raise PruneNetError(
            f"Cannot remove only {total_rows} of {total_width} FFN rows: the per-layer floors "
            f"(min_ratio={min_ratio}) already remove {sum(floors)}. Raise the budget or lower "
            "min_ratio."
        )
    return floors, caps


def _per_layer(value: Ratios, count: int, name: str) -> list[float]:
    if isinstance(value, int | float):
        return [float(value)] * count
    values = [float(v) for v in value]
    if len(values) != count:
        raise PruneNetError(f"Got {len(values)} values of {name} for {count} layers.")
    return values


def _cost_table(curve: CostCurve, width: int, cap: int, index: int) -> np.ndarray:
    """Cost for k = 0..cap as float64, from any accepted curve form."""
    if isinstance(curve, CostGrid):
        table = curve.table(width, cap)
    elif callable(curve):
        table = np.array([float(curve(k)) for k in range(cap + 1)], dtype=np.float64)
    else:
        if isinstance(curve, torch.Tensor):
            curve = curve.detach().cpu().double().numpy()
        table = np.asarray(curve, dtype=np.float64).ravel()
        if table.size < cap + 1:
            raise PruneNetError(
                f"Layer {index}: the cost array has {table.size} entries but the cap allows "
                f"removing {cap} rows; give costs for k = 0..{cap} (or lower max_ratio)."
            )
        table = table[: cap + 1]
    if not np.all(np.isfinite(table)):
        raise PruneNetError(f"Layer {index}: the cost curve has non-finite values.")
    return table


def _parameters_per_row(layer: nn.Module, adapter) -> int:
    inputs, output = ffn_modules(layer, adapter)
    width = ffn_weights(layer, adapter).width
    modules = [*inputs, output]
    total = sum(m.weight.numel() for m in modules)
    total += sum(m.bias.numel() for m in inputs if getattr(m, "bias", None) is not None)
    return total // width
