"""`prunenet train` on the command line: a tiny end-to-end run and refusals with exit code 2."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from prunenet.cli import Terminated, main
from prunenet.rl.checkpoint import read_metadata
from prunenet.rl.ppo.train import BestCheckpointCallback


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


def test_train_with_the_refit_reward_records_it_in_the_checkpoint(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "policy.zip"
    code = _train(
        "--model", str(tiny_model_folder), "--out", str(out), "--reward", "refit",
        "--timesteps", "8", "--eval-every", "8",
    )  # fmt: skip
    assert code == 0
    metadata = read_metadata(out)
    assert metadata["reward"] == "refit" and metadata["train_config"]["reward"] == "refit"
    assert 0 < metadata["eval_reward"] <= 1
    assert "refit reward" in capsys.readouterr().out


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
    err = capsys.readouterr().err
    assert "--timesteps" in err and "at least 1" in err


def test_a_missing_model_exits_with_code_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = _train("--model", str(tmp_path / "none"), "--out", str(tmp_path / "p.zip"))
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "p.zip").exists()


def test_an_existing_out_exits_with_code_2_before_the_model_is_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "p.zip"
    out.write_bytes(b"a previous run")
    assert _train("--model", str(tmp_path / "none"), "--out", str(out)) == 2
    error = capsys.readouterr().err
    assert "already exists" in error and "--overwrite" in error
    assert "does not exist" not in error  # the model was not looked at
    assert out.read_bytes() == b"a previous run"


def _previous_checkpoint(path: Path) -> None:
    """A previous run's checkpoint zip (what --overwrite may replace)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("prunenet.json", "{}")


@pytest.mark.parametrize("content", [b"a previous run", b"PK\x05\x06" + bytes(18)])
def test_overwrite_never_replaces_a_file_that_is_not_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: bytes
) -> None:
    out = tmp_path / "thesis.zip"
    out.write_bytes(content)  # a user's file (the second: an empty zip)
    assert _train("--model", str(tmp_path / "none"), "--out", str(out), "--overwrite") == 2
    assert "not a policy checkpoint" in capsys.readouterr().err
    assert out.read_bytes() == content


def test_overwrite_replaces_an_existing_out(tiny_model_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.zip"
    _previous_checkpoint(out)
    args = ["--model", str(tiny_model_folder), "--out", str(out), "--overwrite"]
    assert _train(*args, "--timesteps", "8", "--eval-every", "8", "--seed", "4") == 0
    assert read_metadata(out)["seed"] == 4


def _messages(stderr: str) -> list[str]:
    """stderr without the progress bar's redraws; asserts there is no traceback."""
    assert "Traceback" not in stderr
    lines = stderr.replace("\r", "\n").splitlines()
    bars = ("PPO steps", "writing ")  # training's and self-generation's progress bars
    return [line for line in lines if line.strip() and not line.startswith(bars)]


def _interrupt_at_step(
    monkeypatch: pytest.MonkeyPatch, step: int, signal: type = KeyboardInterrupt
) -> None:
    """Ctrl-C as SB3 would see it: KeyboardInterrupt from inside a training step."""
    on_step = BestCheckpointCallback._on_step

    def interrupted(self) -> bool:
        if self.num_timesteps == step:
            raise signal
        return on_step(self)

    monkeypatch.setattr(BestCheckpointCallback, "_on_step", interrupted)


def test_ctrl_c_says_where_the_best_checkpoint_is_and_exits_130(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    out = tmp_path / "p.zip"
    _interrupt_at_step(monkeypatch, 12)  # after the evaluation at step 8
    args = ["--model", str(tiny_model_folder), "--out", str(out), "--timesteps", "16"]
    assert _train(*args, "--eval-every", "8") == 130
    error = _messages(capsys.readouterr().err)
    assert len(error) == 1 and error[0].startswith("prunenet train: interrupted by Ctrl-C;")
    assert "best checkpoint so far (step 8, eval reward" in error[0]
    assert error[0].endswith(f"is saved at {out}.")
    assert read_metadata(out)["step"] == 8


def test_ctrl_c_before_any_checkpoint_says_none_was_saved_and_exits_130(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    out = tmp_path / "p.zip"
    _interrupt_at_step(monkeypatch, 3)
    args = ["--model", str(tiny_model_folder), "--out", str(out), "--timesteps", "16"]
    assert _train(*args, "--eval-every", "8") == 130
    error = _messages(capsys.readouterr().err)
    assert error == ["prunenet train: interrupted by Ctrl-C; no checkpoint was saved yet "
                     "(none before the first evaluation)."]  # fmt: skip
    assert not out.exists()


def test_ctrl_c_with_overwrite_before_any_checkpoint_says_the_old_one_is_still_there(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    out = tmp_path / "p.zip"
    _previous_checkpoint(out)
    before = out.read_bytes()
    _interrupt_at_step(monkeypatch, 3)
    args = ["--model", str(tiny_model_folder), "--out", str(out), "--overwrite"]
    assert _train(*args, "--timesteps", "16", "--eval-every", "8") == 130
    assert f"{out} still holds the checkpoint that was there before" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_sigterm_during_training_says_where_the_best_checkpoint_is_and_exits_143(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    out = tmp_path / "p.zip"
    _interrupt_at_step(monkeypatch, 12, Terminated)  # what the CLI's SIGTERM handler raises
    args = ["--model", str(tiny_model_folder), "--out", str(out), "--timesteps", "16"]
    assert _train(*args, "--eval-every", "8") == 143
    error = _messages(capsys.readouterr().err)
    assert len(error) == 1 and error[0].startswith("prunenet train: interrupted by SIGTERM;")
    assert error[0].endswith(f"is saved at {out}.")


def test_threads_below_one_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--model", "x", "--out", "p.zip", "--threads", "0"])
    assert "at least 1" in capsys.readouterr().err
