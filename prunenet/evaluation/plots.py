"""The quality-against-size and quality-against-speed picture, shared by `prunenet pareto` and
`scripts/benchmark_quality.py` so both draw their fronts the same way."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

MARKERS = ("*", "o", "s", "^", "D", "v", "P", "X")


@dataclass
class FrontPoint:
    """One pruned (or the dense) model as the plot reads it.

    :param group: legend entry (strategy or method); one marker per group.
    :param params_removed: share of all parameters removed (x of the left panel).
    :param speedup: prefill speed-up over dense (x of the right panel), None if not timed.
    :param quality: lower is better (y of both panels), None if not measured.
    :param front_params: on the front of quality against parameters.
    :param front_speed: on the front of quality against speed-up.
    """

    group: str
    params_removed: float | None
    speedup: float | None
    quality: float | None
    front_params: bool = False
    front_speed: bool = False


def plot_fronts(
    points: list[FrontPoint],
    path: str | Path,
    *,
    title: str,
    quality_label: str,
    log_quality: bool = False,
    join_front: bool = False,
) -> Path:
    """Two panels, quality against parameters removed and against prefill speed-up: one
    marker per group, points on each panel's front ringed (and joined by a line with
    `join_front`, where one quality number orders the front).

    :param points: the models to draw; points without a finite x or quality are left out.
    :param path: the PNG to write.
    :param title: the figure's title.
    :param quality_label: the y axis (the plot adds "lower is better").
    :param log_quality: log-scale y axis (perplexities spanning orders of magnitude).
    :param join_front: draw each front as a line through its points.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(p.group for p in points))
    markers = {group: MARKERS[i % len(MARKERS)] for i, group in enumerate(groups)}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = (("params_removed", "front_params", "share of all parameters removed"),
              ("speedup", "front_speed", "prefill speed-up over dense"))  # fmt: skip
    for axis, (column, front, label) in zip(axes, panels, strict=True):
        drawn = [p for p in points if _finite(getattr(p, column)) and _finite(p.quality)]
        for group in groups:
            shown = [p for p in drawn if p.group == group]
            if not shown:
                continue
            xs, ys = [getattr(p, column) for p in shown], [p.quality for p in shown]
            dots = axis.scatter(xs, ys, marker=markers[group], s=60, label=group, zorder=3)
            ringed = [(x, y) for x, y, p in zip(xs, ys, shown, strict=True) if getattr(p, front)]
            if ringed:
                axis.scatter(*zip(*ringed, strict=True), s=180, facecolors="none",
                             edgecolors=dots.get_facecolor()[0], linewidths=1.5,
                             zorder=4)  # fmt: skip
        on_front = sorted((getattr(p, column), p.quality) for p in drawn if getattr(p, front))
        if join_front and on_front:
            axis.plot(*zip(*on_front, strict=True), "k-", lw=1, alpha=0.6, label="front", zorder=2)
        if log_quality:
            axis.set_yscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel(f"{quality_label} (lower is better)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
