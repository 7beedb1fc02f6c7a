"""Which results are Pareto-optimal: no other result is at least as good on every objective and
better on one (quality vs parameters, quality vs speed-up)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from prunenet.errors import PruneNetError

DIRECTIONS = ("min", "max")


def non_dominated(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[bool]:
    """For each point, whether no other point dominates it.

    A point with a missing (None or NaN) objective is never on the front and dominates nothing.

    :param points: one tuple of objective values per result.
    :param directions: per objective, `min` (lower is better) or `max`.
    :return: one flag per point, True on the front.
    """
    if any(d not in DIRECTIONS for d in directions):
        raise PruneNetError(f"Directions must be 'min' or 'max', got {list(directions)}.")
    signed = []
    for point in points:
        if len(point) != len(directions):
            raise PruneNetError(
                f"Point {point} has {len(point)} values, expected {len(directions)}."
            )
        usable = all(v is not None and math.isfinite(v) for v in point)
        signed.append(
            tuple(v if d == "min" else -v for v, d in zip(point, directions, strict=True))
            if usable
            else None
        )

    def dominates(a, b) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and a != b

    return [
        point is not None
        and not any(other is not None and dominates(other, point) for other in signed)
        for point in signed
    ]
