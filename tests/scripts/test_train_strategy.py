"""scripts/train_strategy.py: what it refuses before the (long) strategy context is built."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest

from prunenet.errors import PruneNetError
from tests.conftest import load_script


@pytest.fixture(scope="module")
def script():
    yield load_script("train_strategy")
    sys.modules.pop("train_strategy", None)


def test_a_budget_the_ffn_cannot_reach_is_refused_before_the_context(
    script, tiny_model_folder, tmp_path, monkeypatch
):
    # The uniform cut and the ramps it compares against take FFN rows only.
    def built(*args, **kwargs):
        raise AssertionError("the strategy context was built before the budgets were checked")

    monkeypatch.setattr(script, "strategy_context", built)
    argv = ["--model", str(tiny_model_folder), "--compare-only", "--out",
            str(tmp_path / "policy.zip"), "--budgets", "0.1,0.95"]  # fmt: skip
    with pytest.raises(PruneNetError, match="can remove at most"):
        script.main(argv)


def test_base_ramp_reaches_the_training_config_and_the_comparison_runs(
    script, tiny_model_folder, tmp_path, monkeypatch
):
    # The real training (PPO on the real environment) with a few steps on the tiny model.
    seen = {}
    train = script.train_strategy

    def recording(context, config, out, model_name=""):
        seen["config"] = config
        return train(context, replace(config, eval_every=2), out, model_name)

    monkeypatch.setattr(script, "train_strategy", recording)
    out, report = tmp_path / "policy.zip", tmp_path / "report.json"
    argv = ["--model", str(tiny_model_folder), "--base", "ramp", "--structures", "ffn",
            "--timesteps", "8", "--out", str(out), "--budgets", "0.1,0.2",
            "--budget-range", "0.05,0.3", "--search-evaluations", "2", "--report",
            str(report)]  # fmt: skip
    assert script.main(argv) == 0
    assert seen["config"].base == "ramp"
    rows = json.loads(report.read_text())["rows"]
    assert [row["budget"] for row in rows] == [0.1, 0.2]
    for row in rows:  # the ramp-centred search starts from the best ramp: never worse than it
        assert row["ramp_search"]["kl"] <= min(r["kl"] for r in row["ramps"]) + 1e-12
        assert row["policy"]["extra"]["base"] == "ramp"
