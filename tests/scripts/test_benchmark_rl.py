"""scripts/benchmark_rl.py: options, and a --quick run's labelled table on a tiny model."""

from __future__ import annotations

import io
import sys

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    yield load_script("benchmark_rl")
    sys.modules.pop("benchmark_rl", None)


@pytest.fixture(scope="module")
def quick_output(bench, tiny_model_folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNENET_CACHE", str(cache))  # keep the user's analysis cache clean
        argv = ["--quick", "--model", str(tiny_model_folder), "--repeats", "2", "--seed", "5"]
        buffer = io.StringIO()
        patch.setattr(sys, "stdout", buffer)
        assert bench.main(argv) == 0
    return buffer.getvalue()


def table_rows(output: str) -> list[str]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("measurement"))
    return [line for line in lines[start + 2 :] if line.strip() and not line.startswith("whole")]


def test_quick_preset_and_defaults(bench):
    quick = bench.parse_args(["--quick"])
    assert (quick.ppo_timesteps, quick.ppo_eval_every, quick.reinforce_episodes) == (16, 4, 4)
    full = bench.parse_args(["--ppo-timesteps", "90"])
    assert (full.ppo_timesteps, full.reinforce_episodes, full.ratio) == (90, 20, 0.3)
    assert full.ppo_ratios == (0.1, 0.5)
    assert bench.parse_args(["--ppo-ratios", "0.3"]).ppo_ratios == (0.3, 0.3)


@pytest.mark.parametrize("argv", [["--ratio", "1.2"], ["--ppo-ratios", "a:b"], ["--repeats", "0"]])
def test_bad_options_are_usage_errors(bench, argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_quick_run_prints_every_measurement_for_both_trainers(quick_output):
    rows = table_rows(quick_output)
    for measurement in ("train s / episode", "first eval reward", "best eval reward",
                        "train s to best reward", "wall s incl. evaluation"):  # fmt: skip
        trainers = {("PPO" if "PPO" in r else "REINFORCE") for r in rows if measurement in r}
        assert trainers == {"PPO", "REINFORCE"}, measurement
    assert any("train s to reach baseline's best" in r for r in rows)
    assert any("target <= 0.2" in r for r in rows)
    assert any("1st call s (features computed)" in r for r in rows)
    assert any("2nd call s (activations cached; target <= 10)" in r for r in rows)


def test_every_number_is_labelled(quick_output, tiny_model_folder):
    header = next(line for line in quick_output.splitlines() if line.startswith("measurement"))
    for label in ("model", "ratio", "reward", "seed", "device", "threads", "value"):
        assert label in header.split()
    rows = table_rows(quick_output)
    assert len(rows) == 14 * 3  # 14 measurements x (seed 5, seed 6, median)
    for row in rows:
        assert str(tiny_model_folder) in row and " ks " in row and " cpu " in row
    assert sum(" 5 " in r for r in rows) == 14 and sum(" 6 " in r for r in rows) == 14
    assert sum("median of 5,6" in r for r in rows) == 14
    assert all(" 0.25 " in r for r in rows if r.startswith("prune"))


def test_histories_are_printed_with_their_labels(quick_output, tiny_model_folder):
    lines = [line for line in quick_output.splitlines() if "history" in line]
    assert len(lines) == 4  # two trainers x two seeds
    assert all(f"{tiny_model_folder}, seed" in line and "reward ks" in line for line in lines)
