"""scripts/benchmark_selfgen_budget.py: one row per token budget, and its outputs."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def budget():
    yield load_script("benchmark_selfgen_budget")
    sys.modules.pop("benchmark_selfgen_budget", None)


def test_a_quick_run_measures_every_budget_and_writes_table_json_and_plot(
    budget, tiny_model_folder, tmp_path
):
    argv = ["--model", str(tiny_model_folder), "--quick", "--length", "16", "--seqlen", "16",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert budget.main(argv) == 0
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [row["sequences"] for row in record["rows"]] == [4, 8]
    assert [row["tokens"] for row in record["rows"]] == [4 * 16, 8 * 16]
    assert all(row["kl_boolq"] > 0 and row["params_removed"] > 0 for row in record["rows"])
    assert next(tmp_path.glob("*.png")).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("value", ["8,x", "1,8"])
def test_bad_budgets_exit_2(budget, value):
    with pytest.raises(SystemExit) as exit_:
        budget.parse_args(["--sequences", value])
    assert exit_.value.code == 2
