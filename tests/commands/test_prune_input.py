"""`prunenet prune` on careless or hostile input (issue 26, items 8 and 9): every refusal exits 2
with a short message that names the problem and the valid range, before the model is read where
the input allows; a tokenizer the model cannot read is warned about."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from prunenet import runner
from prunenet.cli import main
from prunenet.commands.prune import parse_ratios
from tests.conftest import tiny_model, tiny_tokenizer


def _prune(*argv: str) -> int:
    """The exit code, returned or argparse's SystemExit (stderr is the caller's capsys)."""
    try:
        return main(["prune", *argv])
    except SystemExit as exit_:
        return exit_.code


def _refused(capsys: pytest.CaptureFixture, model: Path, out: Path, *argv: str) -> str:
    """Run prune, expect exit 2 and no output folder; return stderr."""
    code = _prune("--model", str(model), "--out", str(out), "--scorer", "random", *argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert not out.exists()
    return err


@pytest.fixture
def unreadable_model(monkeypatch: pytest.MonkeyPatch):
    """Make reading the model fail loudly: a refusal must come before it."""

    def fail(*args, **kwargs):
        raise AssertionError("the model must not be read for input that is refused")

    monkeypatch.setattr(runner, "load_model", fail)


# ----- seeds and the self-generated text ---------------------------------------------------------


@pytest.mark.usefixtures("unreadable_model")
@pytest.mark.parametrize("seed", [str(2**70), str(2**32), "-1"])
def test_a_seed_outside_what_every_generator_accepts_exits_2_naming_the_range(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, seed: str
) -> None:
    err = _refused(capsys, tiny_model_folder, tmp_path / "out", "--ratio", "0.3", "--seed", seed)
    assert f"seed {seed} must be an integer from 0 to {2**32 - 1}" in err


@pytest.mark.usefixtures("unreadable_model")
@pytest.mark.parametrize("length", ["1", "0", "-3"])
def test_a_selfgen_length_too_short_to_sample_exits_2_naming_the_range(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, length: str
) -> None:
    argv = ("--ratio", "0.3", "--selfgen-length", length)
    err = _refused(capsys, tiny_model_folder, tmp_path / "out", *argv)
    assert f"text_length {length} must be an integer from " in err and "start token" in err


@pytest.mark.usefixtures("unreadable_model")
@pytest.mark.parametrize("sequences", ["0", "-2"])
def test_too_few_selfgen_sequences_exit_2_naming_the_range(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, sequences: str
) -> None:
    argv = ("--ratio", "0.3", "--selfgen-sequences", sequences)
    err = _refused(capsys, tiny_model_folder, tmp_path / "out", *argv)
    assert f"text_sequences {sequences} must be an integer from " in err and "held out" in err


# ----- amounts: parameter terms, duplicates, short messages --------------------------------------


@pytest.mark.usefixtures("unreadable_model")
@pytest.mark.parametrize("budget", ["1.5", "0", "-0.1", "1"])
def test_a_remove_params_value_outside_zero_one_is_refused_in_parameter_terms(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, budget: str
) -> None:
    err = _refused(capsys, tiny_model_folder, tmp_path / "out", "--remove-params", budget)
    assert "outside (0, 1)" in err and "share of ALL parameters" in err
    assert "FFN rows" not in err


def test_a_remove_params_value_beyond_reach_names_the_reachable_share(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = _refused(capsys, tiny_model_folder, tmp_path / "out", "--remove-params", "0.9")
    assert "asks for 90.0% of the parameters" in err and "can remove at most 33.8%" in err


@pytest.mark.usefixtures("unreadable_model")
@pytest.mark.parametrize("flag", ["--remove-params", "--ratio", "--requests"])
def test_ten_thousand_duplicate_amounts_exit_2_with_a_short_message(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, flag: str
) -> None:
    # A comma list this long is no file name either: `stat` refuses it (ENAMETOOLONG).
    err = _refused(capsys, tiny_model_folder, tmp_path / "out", flag, ",".join(["0.2"] * 10_000))
    assert "lists 0.2 more than once" in err
    assert len(err) < 300


@pytest.mark.usefixtures("unreadable_model")
def test_a_file_of_ten_thousand_duplicate_budgets_exits_2_with_a_short_message(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    budgets = tmp_path / "budgets.txt"
    budgets.write_text("\n".join(f"0.{index % 9 + 1}" for index in range(10_000)))
    err = _refused(capsys, tiny_model_folder, tmp_path / "out", "--requests", str(budgets))
    assert "lists 0.1, 0.2, 0.3, 0.4, 0.5, ... (4 more) more than once" in err
    assert len(err) < 300


@pytest.mark.usefixtures("unreadable_model")
def test_a_long_list_that_is_not_numbers_is_echoed_only_in_part(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    amounts = "0.1,x" + ",0.2" * 10_000
    err = _refused(capsys, tiny_model_folder, tmp_path / "out", "--remove-params", amounts)
    assert "neither a comma list of numbers" in err
    assert len(err.splitlines()[-1]) < 300


# ----- a tokenizer the model cannot read --------------------------------------------------------


@pytest.mark.parametrize("route", ["memory", "layerwise"])
def test_prune_warns_that_a_tokenizer_with_ids_beyond_the_embedding_will_not_evaluate(
    tmp_path: Path, capsys: pytest.CaptureFixture, route: str
) -> None:
    folder = tmp_path / "mismatched"
    tiny_model("llama", vocab_size=32).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)  # ids 0..63
    argv = ["--model", str(folder), "--out", str(tmp_path / "out"), "--ratio", "0.3",
            "--text", "4x8", "--route", route]  # fmt: skip
    code = _prune(*argv)
    err = capsys.readouterr().err
    assert code == 0
    assert "warning" in err and "token ids up to 63 (64 ids)" in err
    assert "embedding has 32 rows" in err and "`prunenet eval` will refuse it" in err


def test_prune_says_nothing_about_a_tokenizer_that_fits(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["--model", str(tiny_model_folder), "--out", str(tmp_path / "out"), "--ratio", "0.3",
            "--text", "4x8"]  # fmt: skip
    assert _prune(*argv) == 0
    assert "token ids" not in capsys.readouterr().err


def test_repeated_ratios_of_a_long_list_are_each_named_once() -> None:
    # `prunenet pareto` reads its ratio lists with this (prune's own lists go to the request).
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        parse_ratios(",".join(["0.2", "0.3"] * 5_000))
    assert str(refused.value) == "Values 0.2, 0.3 repeat a value of the list; list each one once."


@pytest.mark.usefixtures("unreadable_model")
def test_a_long_ratio_list_that_is_not_numbers_is_echoed_only_in_part(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = _refused(capsys, tiny_model_folder, tmp_path / "out", "--ratio", "0.1,x" * 10_000)
    assert "is not a number or a comma list of numbers" in err
    assert len(err.splitlines()[-1]) < 300
