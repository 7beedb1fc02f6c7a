import math

import matplotlib
import pytest
from matplotlib.figure import Figure

from prunenet.evaluation.plots import FrontPoint, plot_fronts

matplotlib.use("Agg")


@pytest.fixture
def drawn(monkeypatch):
    """The figure each plot_fronts call saves (it still writes the file)."""
    figures = []
    save = Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def _offsets(axis):
    return [[tuple(xy) for xy in c.get_offsets()] for c in axis.collections]


def test_each_group_is_drawn_and_front_points_are_ringed(tmp_path, drawn):
    points = [
        FrontPoint("dense", 0.0, 1.0, 2.0, front_params=True, front_speed=True),
        FrontPoint("uniform", 0.2, 1.3, 2.5, front_params=True),
        FrontPoint("uniform", 0.3, None, 3.0),  # not timed: left out of the speed panel only
        FrontPoint("policy", 0.2, 1.2, math.inf),  # broken model: left out of both
    ]
    path = plot_fronts(points, tmp_path / "f.png", title="t", quality_label="q", join_front=True)
    assert path.is_file() and path.stat().st_size > 0
    size, speed = drawn[0].axes
    # dense, its ring, uniform, uniform's ring (the policy point draws nothing)
    assert _offsets(size) == [[(0.0, 2.0)], [(0.0, 2.0)], [(0.2, 2.5), (0.3, 3.0)], [(0.2, 2.5)]]
    assert _offsets(speed) == [[(1.0, 2.0)], [(1.0, 2.0)], [(1.3, 2.5)]]
    (line,) = size.lines  # the front joined: through dense and the first uniform point
    assert list(zip(*line.get_data(), strict=True)) == [(0.0, 2.0), (0.2, 2.5)]
    assert [t.get_text() for t in size.get_legend().get_texts()] == ["dense", "uniform", "front"]


def test_without_join_no_line_is_drawn_and_log_scale_is_used_when_asked(tmp_path, drawn):
    points = [FrontPoint("a", 0.1, 1.1, 10.0, True, True), FrontPoint("b", 0.2, 1.2, 100.0)]
    plot_fronts(points, tmp_path / "f.png", title="t", quality_label="q", log_quality=True)
    size, _ = drawn[0].axes
    assert len(size.lines) == 0 and size.get_yscale() == "log"
