"""scripts/strategy_proxy.py: masked KL against the cut model's KL, on the tiny Llama."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import load_script

pytestmark = pytest.mark.usefixtures("no_disk_cache")


@pytest.fixture(scope="module")
def proxy():
    yield load_script("strategy_proxy")
    sys.modules.pop("strategy_proxy", None)


def test_every_strategy_gets_both_kls_and_the_summary_ranks_them(
    proxy, tiny_model_folder, tmp_path
):
    argv = ["--model", str(tiny_model_folder), "--budget", "0.15", "--structures", "ffn,layers",
            "--random", "2", "--text", "8x12", "--threads", "1",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert proxy.main(argv) == 0
    record = json.loads((tmp_path / "strategy_proxy.json").read_text())
    rows = record["rows"]
    names = ["uniform", "ramp 0.1", "ramp 0.3", "ramp 0.5", "random 0", "random 1"]
    assert [row["strategy"] for row in rows] == names
    assert all(row["masked_kl"] > 0 and row["cut_kl"] > 0 for row in rows)
    # The refit changes the model, so the two KLs differ; the summary names real strategies.
    assert any(abs(row["masked_kl"] - row["cut_kl"]) > 1e-6 for row in rows)
    names = {row["strategy"] for row in rows}
    summary = record["summary"]["cut_kl"]
    assert summary["proxy_pick"] in names and summary["real_best"] in names
    assert summary["regret"] >= 0 and -1 <= summary["spearman"] <= 1
    assert (tmp_path / "strategy_proxy.png").stat().st_size > 0
    assert "Spearman" in (tmp_path / "strategy_proxy.md").read_text()


def test_without_a_refit_the_masks_rows_cut_give_the_masked_kl(proxy, tiny_model_folder, tmp_path):
    # Without a refit, the masks' rows cut are the masked model: both KLs read the same tokens
    # with the same code (what makes the comparison above fair).
    argv = ["--model", str(tiny_model_folder), "--budget", "0.15", "--structures", "ffn,layers",
            "--random", "1", "--text", "8x12", "--threads", "1", "--refit", "none",
            "--scorer", "magnitude", "--out-dir", str(tmp_path)]  # fmt: skip
    assert proxy.main(argv) == 0
    rows = json.loads((tmp_path / "strategy_proxy.json").read_text())["rows"]
    for row in rows:
        assert row["mask_rows_refit_kl"] == pytest.approx(row["masked_kl"], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("text", ["abc", "0x12"])
def test_a_bad_text_exits_2_before_loading_anything(proxy, text, capsys):
    with pytest.raises(SystemExit) as exit_:
        proxy.parse_args(["--text", text])
    assert exit_.value.code == 2
    assert "--text" in capsys.readouterr().err
