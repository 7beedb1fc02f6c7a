"""The one place that says what a ratio is and how many rows it keeps.

A ratio is the fraction of FFN rows removed (the paper's "compression ratio"), always in the
open interval (0, 1): 0 would prune nothing and 1 would empty the layer. Every command, trainer,
environment and allocator validates through here, so they all refuse the same values with the
same message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from prunenet.errors import PruneNetError


def validate_ratio(ratio) -> float:
    """A ratio as float in (0, 1), or a clear error.

    :param ratio: anything `float()` accepts (CLI text, numbers).
    """
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise PruneNetError(f"Ratio {ratio!r} is not a number; pass a value in (0, 1).") from None
    if not math.isfinite(value) or not 0.0 < value < 1.0:
        raise PruneNetError(
            f"Ratio {ratio!r} is outside (0, 1). It is the fraction of FFN rows removed: "
            "0.3 removes 30% of each FFN's neurons."
        )
    return value


def validate_ratio_range(ratio_range) -> tuple[float, float]:
    """(low, high) with both valid ratios and low <= high (training samples ratios from it).

    :param ratio_range: a pair of ratios.
    """
    try:
        low, high = (validate_ratio(r) for r in ratio_range)
    except (TypeError, ValueError) as error:
        raise PruneNetError(
            f"Invalid ratio range {ratio_range!r}: give two ratios low <= high in (0, 1), "
            f"e.g. 0.1:0.5 ({error})."
        ) from None
    if low > high:
        raise PruneNetError(f"Ratio range {low}:{high} is empty: low must be <= high.")
    return low, high


def keep_count(width: int, ratio: float) -> int:
    """Rows kept at `ratio`: round((1 - r) * width), refusing to remove every row.

    :param width: rows of the FFN (d_ff).
    :param ratio: fraction removed.
    """
    kept = round((1.0 - validate_ratio(ratio)) * width)
    if kept < 1:
        # Suggest 1 - 1/width rounded down: (1 - r) * width = 0.5 would round to 0 (half to
        # even), so the boundary itself is not a safe suggestion.
        largest = math.floor((1.0 - 1.0 / width) * 1e4) / 1e4
        raise PruneNetError(
            f"Ratio {ratio} would remove all {width} FFN rows of a layer; use a smaller ratio "
            f"(at most {largest:.4f} keeps one row)."
        )
    return kept


def uniform_keep(widths: Sequence[int], ratio: float) -> list[int]:
    """Rows kept per layer when every layer loses the same `ratio`.

    :param widths: each layer's FFN width.
    :param ratio: fraction removed in every layer.
    """
    return [keep_count(width, ratio) for width in widths]


def rows_for_ratio(widths: Sequence[int], ratio: float) -> int:
    """Rows to remove for a global ratio: `ratio` of all FFN rows, rounded to the nearest row.

    :param widths: each layer's FFN width.
    :param ratio: fraction of all FFN rows removed.
    """
    return round(validate_ratio(ratio) * sum(widths))
