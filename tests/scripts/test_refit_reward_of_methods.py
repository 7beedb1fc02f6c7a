"""scripts/refit_reward_of_methods.py: one row per method, analysis and ratio, and its outputs."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def script():
    yield load_script("refit_reward_of_methods")
    sys.modules.pop("refit_reward_of_methods", None)


def test_every_method_analysis_and_ratio_gets_a_mean_refit_reward(
    script, tiny_model_folder, tmp_path
):
    argv = ["--model", str(tiny_model_folder), "--methods", "selfgen,policy", "--ratios",
            "0.25,0.5", "--out-dir", str(tmp_path)]  # fmt: skip
    assert script.main(argv) == 0
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    keys = [(row["method"], row["analysis"], row["ratio"]) for row in rows]
    assert keys == [
        (method, analysis, ratio)
        for method in ("selfgen", "policy")
        for analysis in ("oneshot", "sequential")
        for ratio in (0.25, 0.5)
    ]
    for row in rows:
        assert 0 < row["worst_reward"] <= row["mean_reward"] <= 1
        assert len(row["layer_rewards"]) == 2
    by_key = {(r["method"], r["analysis"], r["ratio"]): r["mean_reward"] for r in rows}
    assert by_key["selfgen", "oneshot", 0.25] > by_key["selfgen", "oneshot", 0.5]
    assert "mean refit reward" in next(tmp_path.glob("*.md")).read_text()


def test_an_unknown_method_exits_2(script):
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(["--methods", "nope"])
    assert exit_.value.code == 2
