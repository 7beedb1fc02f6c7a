"""scripts/train_strategy.py: what it refuses before the (long) strategy context is built."""

from __future__ import annotations

import sys

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
