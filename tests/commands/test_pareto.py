"""`prunenet pareto`: the whole grid end to end, the same cuts as `prunenet prune`, and bad
requests refused (exit 2) before the model is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunenet import front
from prunenet.allocation.structures import Costs
from prunenet.cli import main
from prunenet.commands import pareto as pareto_command
from prunenet.core.compress import count_parameters
from prunenet.evaluation.pareto import non_dominated
from prunenet.io.loading import load_pruned
from prunenet.io.saving import REPORT_FILE

BUDGETS = (0.1, 0.2)
SMALL = ["--scorer", "magnitude", "--text", "4x12"]
SMALL_EVAL = ["--seqlen", "8", "--ppl-windows", "2"]
QUICK = [*SMALL, *SMALL_EVAL, "--speed-rounds", "1", "--prefill-tokens", "8",
         "--search-evaluations", "2"]  # fmt: skip


def _run(*argv: str) -> int:
    try:
        return main(list(argv))
    except SystemExit as exit_:  # argparse's usage errors
        return exit_.code


@pytest.fixture(scope="module")
def grid(tiny_model_folder: Path, tmp_path_factory) -> tuple[Path, dict, str]:
    """Every strategy (the bundled strategy policy included) at two budgets on the tiny Llama."""
    out = tmp_path_factory.mktemp("pareto") / "front"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNENET_NO_CACHE", "1")
        patch.setenv("PRUNENET_CACHE", str(tmp_path_factory.mktemp("cache")))
        code = _run("pareto", "--model", str(tiny_model_folder), "--remove-params",
                    ",".join(map(str, BUDGETS)), "--out", str(out), *QUICK)  # fmt: skip
    assert code == 0
    return out, json.loads((out / "pareto.json").read_text()), (out / "pareto.md").read_text()


def test_the_grid_writes_json_markdown_and_plot(grid) -> None:
    out, _, _ = grid
    assert sorted(p.name for p in out.iterdir()) == ["pareto.json", "pareto.md", "pareto.png"]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_there_is_one_row_per_budget_and_strategy_each_within_its_budget(
    grid, tiny_model_folder
) -> None:
    _, record, _ = grid
    expected = [(b, s) for b in BUDGETS for s in front.STRATEGIES]
    assert [(r["budget"], r["strategy"]) for r in record["rows"]] == expected
    costs = Costs(load_pruned(tiny_model_folder), refit_biases=True)
    assert record["protocol"]["dense_params"] == costs.dense
    for row in record["rows"]:
        # uniform: at most one FFN row more per layer; a per-layer strategy: one row in all.
        slack = sum(costs.per_row) if row["strategy"] == "uniform" else max(costs.per_row)
        assert row["budget"] <= row["params_removed"] <= row["budget"] + slack / costs.dense
        assert row["params"] == costs.dense - row["strategy_detail"]["params_removed"]
        assert row["strategy_detail"].get("source", "uniform") in (row["strategy"], "")


def test_every_row_has_each_domain_kl_speed_and_quality(grid) -> None:
    _, record, _ = grid
    for row in record["rows"]:
        assert set(row["perplexity"]) == set(row["kl"]) == {"ppl_boolq", "ppl_lambada", "ppl_code"}
        assert row["speedup_prefill"] > 0 and row["prefill_tok_s"] > 0
        assert row["quality"] is not None
    assert record["dense"]["kl"] == {"ppl_boolq": 0.0, "ppl_lambada": 0.0, "ppl_code": 0.0}


def test_the_front_flags_are_the_non_dominated_points(grid) -> None:
    _, record, _ = grid
    points = [record["dense"], *record["rows"]]
    size = non_dominated([(p["params"], p["quality"]) for p in points], ["min", "min"])
    speed = non_dominated([(p["speedup_prefill"], p["quality"]) for p in points], ["max", "min"])
    assert [p["front_params"] for p in points] == size
    assert [p["front_speed"] for p in points] == speed
    assert record["dense"]["front_params"]  # nothing is better than dense at dense size


def test_the_record_carries_the_full_protocol(grid, tiny_model_folder) -> None:
    _, record, _ = grid
    protocol = record["protocol"]
    for key in [
        "command",
        "model",
        "budgets",
        "strategies",
        "quality",
        "quality_definition",
        "analysis_text",
        "strategy_text",
        "evaluation",
        "speed",
        "seed",
        "threads",
        "device",
        "versions",
        "scorer",
        "refit",
        "strategy_policy",
        "wall_seconds",
    ]:
        assert key in protocol, key  # fmt: skip
    assert protocol["model"] == str(tiny_model_folder)
    assert protocol["evaluation"]["seqlen"] == 8 and protocol["evaluation"]["ppl_windows"] == 2
    assert protocol["analysis_text"]["sequences"] == 4 and protocol["refit"] == "lsq"
    assert protocol["threads"] == 1 and protocol["device"].startswith("cpu")
    assert "--search-evaluations 2" in protocol["command"]


def test_the_markdown_names_the_quality_and_marks_the_fronts(grid) -> None:
    _, record, markdown = grid
    assert "quality: mean log-perplexity" in markdown and "geometric mean" in markdown
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    assert len(table_rows) == 1 + len(record["rows"])
    marks = [line.rstrip(" |").rsplit("| ", 1)[1] for line in table_rows]
    for point, mark in zip([record["dense"], *record["rows"]], marks, strict=True):
        assert ("P" in mark) == point["front_params"] and ("S" in mark) == point["front_speed"]


@pytest.mark.usefixtures("no_disk_cache")
def test_the_uniform_row_has_the_parameters_prune_gives(grid, tiny_model_folder, tmp_path) -> None:
    _, record, _ = grid
    uniform = {r["budget"]: r["params"] for r in record["rows"] if r["strategy"] == "uniform"}
    for budget, params in uniform.items():
        out = tmp_path / f"pruned-{budget}"
        assert _run("prune", "--model", str(tiny_model_folder), "--remove-params", str(budget),
                    "--out", str(out), *SMALL) == 0  # fmt: skip
        assert count_parameters(load_pruned(out)) == params
        assert json.loads((out / REPORT_FILE).read_text())["params_after"] == params


@pytest.fixture
def no_model_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was read before the request was refused")

    monkeypatch.setattr(pareto_command, "load_model", refuse)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--strategies", "uniform,greedy"), "Unknown strategy 'greedy'"),
        (("--strategies", ""), "No strategy"),
        (("--strategies", ","), "No strategy"),
        (("--strategies", "ramp,ramp"), "repeat a name"),
        (("--remove-params", "0.2,1.5"), "budget '1.5' is not a fraction in (0, 1)"),
        (("--remove-params", "0"), "budget '0' is not a fraction"),
        (("--remove-params", "x"), "budget 'x' is not a fraction"),
        (("--remove-params", "0.2,0.2"), "repeat a value"),
        (("--quality", "ppl"), "invalid choice"),
        (("--tasks", "piqa"), "names no perplexity text"),
        (("--tasks", "ppl_wikitext"), "Unknown perplexity text"),
        (("--strategies", "uniform", "--strategy-policy", "x.zip"), "only read when"),
        (("--strategies", "policy", "--strategy-policy", "missing.zip"), "could not be read"),
        (("--device", "cuda:99"), "cuda"),
    ],
)  # fmt: skip
@pytest.mark.usefixtures("no_model_reading")
def test_bad_requests_exit_2_before_the_model_is_read(
    tmp_path, capsys, monkeypatch, extra, message
) -> None:
    monkeypatch.chdir(tmp_path)
    code = _run("pareto", "--model", "tiny", "--out", str(tmp_path / "out"), *SMALL, *extra)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("no_model_reading")
def test_an_existing_out_exits_2_without_overwrite(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _run("pareto", "--model", "tiny", "--out", str(out), *SMALL) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.usefixtures("no_disk_cache")
def test_a_budget_the_ffn_cannot_reach_exits_2_before_any_cut(
    tiny_model_folder, tmp_path, capsys, monkeypatch
) -> None:
    def no_sweep(*args, **kwargs):
        raise AssertionError("the sweep started")

    monkeypatch.setattr(pareto_command, "sweep", no_sweep)
    out = tmp_path / "out"
    code = _run("pareto", "--model", str(tiny_model_folder), "--remove-params", "0.95",
                "--out", str(out), *SMALL)  # fmt: skip
    assert code == 2
    assert "can remove at most" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.usefixtures("no_disk_cache")
def test_overwrite_replaces_the_folder_with_a_complete_one(
    tiny_model_folder, tmp_path, monkeypatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "pareto.json").write_text("{}")  # a pareto folder: what --overwrite may replace
    (out / "old.txt").write_text("old")
    code = _run("pareto", "--model", str(tiny_model_folder), "--remove-params", "0.2",
                "--strategies", "uniform", "--speed-rounds", "0", "--quality", "kl",
                "--overwrite", "--out", str(out), *SMALL, *SMALL_EVAL)  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["pareto.json", "pareto.md", "pareto.png"]
    record = json.loads((out / "pareto.json").read_text())
    assert record["protocol"]["quality"] == "kl"
    row = record["rows"][0]
    assert row["quality"] == pytest.approx(sum(row["kl"].values()) / 3)
