"""The Pareto sweep as a library: one row per (budget, strategy) within the budget, the right
points on each front, the scalar quality, and files that are complete or absent."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from prunenet import front
from prunenet.allocation.structures import Costs
from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.errors import PruneNetError
from prunenet.front import (
    ParetoResult,
    ParetoRow,
    SweepSettings,
    mark_fronts,
    pareto_suite,
    quality_of,
    sweep,
)
from prunenet.pipeline import scorer_planner
from prunenet.scoring.registry import make_scorer
from tests.conftest import logits_of, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("no_disk_cache")

SMALL_TEXT = SelfGenConfig(sequences=4, length=12, seed=0)


def _point(name: str, params: int, quality: float | None, speedup: float | None) -> ParetoRow:
    return ParetoRow(strategy=name, budget=0.1, params=params, params_removed=0.0,
                     ffn_rows_removed=0.0, ffn_widths=[], perplexity={}, kl={},
                     quality=quality, speedup_prefill=speedup)  # fmt: skip


def test_fronts_keep_exactly_the_points_no_other_point_beats() -> None:
    rows = [
        _point("dense", 100, 1.0, 1.0),  # best quality: on both fronts
        _point("a", 80, 2.0, 1.2),  # smaller than dense, faster: on both
        _point("b", 80, 2.5, 1.3),  # as small as a but worse: off size; fastest: on speed
        _point("c", 60, 3.0, 1.1),  # smallest: on size; slower and worse than a: off speed
        _point("d", 90, 2.2, 1.15),  # bigger and worse than a, slower and worse than a: off both
        _point("e", 70, None, 2.0),  # no quality: on no front, beats nothing
    ]
    mark_fronts(rows)
    assert [r.front_params for r in rows] == [True, True, False, True, False, False]
    assert [r.front_speed for r in rows] == [True, True, True, False, False, False]


def test_a_row_that_was_not_timed_is_off_the_speed_front_only() -> None:
    rows = [_point("dense", 100, 1.0, 1.0), _point("a", 50, 2.0, None)]
    mark_fronts(rows)
    assert [r.front_params for r in rows] == [True, True]
    assert [r.front_speed for r in rows] == [True, False]


def test_log_ppl_quality_is_the_mean_log_perplexity_over_the_texts() -> None:
    perplexity = {"ppl_boolq": math.e, "ppl_lambada": math.e**3, "ppl_code": math.e**5}
    assert quality_of(perplexity, {}, "log_ppl") == pytest.approx(3.0)
    assert quality_of({"a": 10.0}, {"a": 0.5, "b": 1.5}, "kl") == pytest.approx(1.0)


def test_a_non_finite_value_gives_no_quality_and_an_unknown_quality_is_refused() -> None:
    assert quality_of({"a": math.inf, "b": 2.0}, {}, "log_ppl") is None
    assert quality_of({}, {"a": math.nan}, "kl") is None
    with pytest.raises(PruneNetError, match="Unknown quality"):
        quality_of({"a": 2.0}, {}, "ppl")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategies": ()}, "No strategy"),
        ({"strategies": ("uniform", "greedy")}, "Unknown strategy 'greedy'"),
        ({"strategies": ("ramp", "ramp")}, "repeat a name"),
        ({"budgets": ()}, "No parameter budget"),
        ({"budgets": (0.2, 1.0)}, "not a fraction"),
        ({"budgets": (0.0,)}, "not a fraction"),
        ({"budgets": (0.2, 0.2)}, "repeat a value"),
        ({"quality": "ppl"}, "Unknown quality"),
        ({"refit": "ridge"}, "refit"),
        ({"speed_rounds": -1}, "at least 0"),
    ],
)
def test_settings_refuse_a_grid_that_cannot_run(changes: dict, message: str) -> None:
    settings = {"budgets": (0.2,), "strategies": ("uniform",), **changes}
    with pytest.raises(PruneNetError, match=message):
        SweepSettings(**settings).check()


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[torch.nn.Module, torch.Tensor, ParetoResult]:
    """One sweep read by several tests (none changes it); its text kept out of every cache."""
    model = tiny_model("llama")
    before = logits_of(model)
    suite = pareto_suite(model, tiny_tokenizer(), ["ppl_boolq", "ppl_code"], seqlen=8,
                         ppl_windows=2)  # fmt: skip
    settings = SweepSettings(budgets=(0.1, 0.2), strategies=("uniform", "ramp"), refit="lsq",
                             selfgen=SMALL_TEXT, speed_rounds=0)  # fmt: skip
    planner = scorer_planner(make_scorer("magnitude"), analysis="oneshot")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNENET_NO_CACHE", "1")
        patch.setenv("PRUNENET_CACHE", str(tmp_path_factory.mktemp("cache")))
        return model, before, sweep(model, planner, suite, settings)


def test_the_grid_has_one_row_per_budget_and_strategy_within_the_budget(swept) -> None:
    model, _, result = swept
    assert [(r.budget, r.strategy) for r in result.rows] == [
        (0.1, "uniform"), (0.1, "ramp"), (0.2, "uniform"), (0.2, "ramp")
    ]  # fmt: skip
    costs = Costs(model, refit_biases=True)
    for row in result.rows:
        # uniform: at most one FFN row more per layer; a strategy: at most one row in all.
        slack = sum(costs.per_row) if row.strategy == "uniform" else max(costs.per_row)
        assert row.budget <= row.params_removed <= row.budget + slack / costs.dense, row
        assert row.params == costs.dense - row.strategy_detail["params_removed"]
    assert result.rows[1].strategy_detail["source"] == "ramp"
    assert result.rows[1].strategy_kl is not None and result.rows[0].strategy_kl is None


def test_the_sweep_leaves_the_dense_model_dense_and_measures_each_domain(swept) -> None:
    model, before, result = swept
    torch.testing.assert_close(logits_of(model), before, rtol=0, atol=0)
    assert result.dense.kl == {"ppl_boolq": 0.0, "ppl_code": 0.0}
    assert result.dense.speedup_prefill == 1.0 and result.dense.params_removed == 0.0
    for row in result.rows:
        assert set(row.perplexity) == set(row.kl) == {"ppl_boolq", "ppl_code"}
        assert row.quality == pytest.approx(sum(math.log(v) for v in row.perplexity.values()) / 2)
        assert row.speedup_prefill is None and not row.front_speed  # speed_rounds 0
    assert result.dense.front_params and result.dense.front_speed


def test_the_protocol_names_what_defines_the_numbers(swept) -> None:
    protocol = swept[2].protocol
    assert protocol["quality"] == "log_ppl" and "geometric mean" in protocol["quality_definition"]
    assert protocol["analysis_text"] == {"sequences": 4, "length": 12, "seed": 0,
                                         "kept_tokens": 256}  # fmt: skip
    assert protocol["evaluation"]["seqlen"] == 8 and protocol["evaluation"]["ppl_windows"] == 2
    assert protocol["budgets"] == [0.1, 0.2] and protocol["strategies"] == ["uniform", "ramp"]
    assert {"device", "threads", "versions", "seed", "speed"} <= set(protocol)


def test_outputs_are_written_together(swept, tmp_path: Path) -> None:
    out = tmp_path / "front"
    paths = front.write_outputs(swept[2], out)
    assert sorted(p.name for p in paths) == ["pareto.json", "pareto.md", "pareto.png"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    record = json.loads((out / "pareto.json").read_text())
    assert len(record["rows"]) == 4 and record["dense"]["strategy"] == "dense"
    markdown = (out / "pareto.md").read_text()
    assert "quality = mean log-perplexity" in markdown and "| front |" in markdown


def test_a_failed_write_leaves_no_folder(swept, tmp_path: Path, monkeypatch) -> None:
    def broken_plot(result, path):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(front, "plot_fronts", broken_plot)
    with pytest.raises(RuntimeError, match="plotting failed"):
        front.write_outputs(swept[2], tmp_path / "front")
    assert list(tmp_path.iterdir()) == []


def test_a_budget_the_ffn_cannot_reach_is_refused_before_the_dense_evaluation() -> None:
    model = tiny_model("llama")
    suite = pareto_suite(model, tiny_tokenizer(), ["ppl_boolq"], seqlen=8, ppl_windows=2)

    def evaluated(*args, **kwargs):
        raise AssertionError("the dense model was evaluated before the budgets were checked")

    suite.run = evaluated
    settings = SweepSettings(budgets=(0.1, 0.95), strategies=("uniform",), refit="none",
                             selfgen=SMALL_TEXT, speed_rounds=0)  # fmt: skip
    planner = scorer_planner(make_scorer("magnitude"), analysis="oneshot")
    with pytest.raises(PruneNetError, match="can remove at most"):
        sweep(model, planner, suite, settings)
