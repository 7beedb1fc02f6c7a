"""`prunenet train` on the command line: a tiny end-to-end run and refusals with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunenet.cli import main
from prunenet.policy import read_metadata


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache"))


def _train(*args: str) -> int:
    """Run `prunenet train ARGS`; argparse's own refusals come back as their exit code."""
    try:
        return main(["train", *args])
    except SystemExit as exit_:
        return exit_.code


def test_train_writes_a_checkpoint_and_prints_a_summary(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "policy.zip"
    code = _train(
        "--model", str(tiny_model_folder), "--out", str(out), "--ratios", "0.2:0.4",
        "--timesteps", "8", "--eval-every", "8", "--seed", "5",
    )  # fmt: skip
    assert code == 0
    metadata = read_metadata(out)
    assert metadata["source_model"] == str(tiny_model_folder)
    assert metadata["ratios"] == [0.2, 0.4] and metadata["seed"] == 5
    printed = capsys.readouterr().out
    assert f"saved {out}" in printed and "best eval reward" in printed


def test_a_single_ratio_is_a_range_of_one(tiny_model_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "policy.zip"
    args = ["--model", str(tiny_model_folder), "--out", str(out), "--ratios", "0.3"]
    assert _train(*args, "--timesteps", "8", "--eval-every", "8") == 0
    assert read_metadata(out)["ratios"] == [0.3, 0.3]


@pytest.mark.parametrize("ratios", ["abc", "0.1:x", "0.1:0.2:0.3"])
def test_non_numeric_ratios_exit_with_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, ratios: str
) -> None:
    code = _train("--model", "unused", "--out", str(tmp_path / "p.zip"), "--ratios", ratios)
    assert code == 2
    assert "is not LOW:HIGH with numbers" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("ratios", "message"),
    [("0.5:0.1", "is empty: low must be <= high"), ("0:0.5", "outside (0, 1)"),
     ("0.2:1", "outside (0, 1)")],
)  # fmt: skip
def test_an_unusable_ratio_range_exits_with_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, ratios: str, message: str
) -> None:
    code = _train("--model", str(tmp_path / "none"), "--out", str(tmp_path / "p.zip"),
                  "--ratios", ratios)  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("prunenet train: error:") and message in error
    assert not (tmp_path / "p.zip").exists()


def test_a_checkpoint_path_not_ending_in_zip_exits_with_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert _train("--model", str(tmp_path / "none"), "--out", str(tmp_path / "p.pt")) == 2
    assert "must end in .zip" in capsys.readouterr().err


def test_a_non_positive_timestep_budget_exits_with_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = _train("--model", str(tmp_path / "none"), "--out", str(tmp_path / "p.zip"),
                  "--timesteps", "0")  # fmt: skip
    assert code == 2
    assert "--timesteps must be positive" in capsys.readouterr().err


def test_a_missing_model_exits_with_code_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = _train("--model", str(tmp_path / "none"), "--out", str(tmp_path / "p.zip"))
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "p.zip").exists()
