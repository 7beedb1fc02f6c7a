"""`prunenet recover` end to end: a reloadable folder, determinism, refusals with exit code 2
before any training, no dataset file opened, nothing left behind by an interrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prunenet.cli import build_parser, main
from prunenet.commands.recover import UNBOUNDED_STEPS, recovery_config
from prunenet.errors import Terminated
from prunenet.io.saving import REPORT_FILE
from prunenet.recovery import distill as distill_module
from prunenet.recovery import saving as recovery_saving
from prunenet.recovery.saving import RECOVER_REPORT_FILE
from tests.commands.test_prune_data_free import DATASET_MARKERS, PROBE
from tests.conftest import logits_of, tiny_model, tiny_tokenizer

QUICK = ["--steps", "4", "--eval-every", "2", "--sequences", "8"]


@pytest.fixture(scope="module")
def pruned_folder(tiny_model_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama pruned by the prune command (random scores, so it is fast), once for the
    module: every test only reads it. Its text goes to a private cache, not the user's."""
    folder = tmp_path_factory.mktemp("recover") / "pruned"
    argv = ["prune", "--model", str(tiny_model_folder), "--ratio", "0.5", "--scorer", "random"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNENET_CACHE", str(tmp_path_factory.mktemp("prune-cache")))
        assert main([*argv, "--out", str(folder)]) == 0
    return folder


def _recover(model: Path | str, teacher: Path | str, out: Path, *extra: str) -> int:
    argv = ["recover", "--model", str(model), "--teacher", str(teacher), "--out", str(out)]
    return main([*argv, *QUICK, *extra])


def _refused_with_exit_2(capsys: pytest.CaptureFixture, *args) -> str:
    try:
        code = _recover(*args)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    return capsys.readouterr().err


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusals must come before training: reaching `distill` fails the test."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("training started although the input should have been refused")

    monkeypatch.setattr("prunenet.commands.recover.distill", must_not_run)


# ----- success ----------------------------------------------------------------------------------


def test_recover_writes_a_folder_that_loads_like_the_pruned_input(
    tiny_model_folder: Path, pruned_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert _recover(pruned_folder, tiny_model_folder, out) == 0

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    pruned = AutoModelForCausalLM.from_pretrained(pruned_folder).eval()
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (pruned_folder / "config.json").read_text()
    )
    assert not torch.allclose(logits_of(reloaded), logits_of(pruned))
    assert (out / "tokenizer.json").is_file()
    assert (out / REPORT_FILE).read_text() == (pruned_folder / REPORT_FILE).read_text()
    report = json.loads((out / RECOVER_REPORT_FILE).read_text())
    assert report["steps"] == 4 and report["seed"] == 0 and report["rank"] == 8
    assert report["held_out_kl_after"] <= report["held_out_kl_before"]
    assert {"seconds", "lr", "train_tokens", "held_out_tokens", "train_losses"} <= set(report)
    card = (out / "README.md").read_text()
    assert "## Recovery" in card and "4 steps" in card and "prunenet_recover_report.json" in card


def test_same_seed_writes_identical_tensors_and_another_seed_different_ones(
    tiny_model_folder: Path, pruned_folder: Path, tmp_path: Path
) -> None:
    for name, seed in [("a", "0"), ("b", "0"), ("c", "1")]:
        assert _recover(pruned_folder, tiny_model_folder, tmp_path / name, "--seed", seed) == 0
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_a_teacher_of_another_depth_with_the_same_vocabulary_is_accepted(
    pruned_folder: Path, tmp_path: Path
) -> None:
    teacher = tmp_path / "deeper"
    tiny_model("llama", num_hidden_layers=3).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    assert _recover(pruned_folder, teacher, tmp_path / "out") == 0


def test_a_model_folder_without_tokenizer_gets_the_teachers(
    tiny_model_folder: Path, tmp_path: Path
) -> None:
    student = tmp_path / "no-tokenizer"
    tiny_model("llama", seed=9).save_pretrained(student)
    assert _recover(student, tiny_model_folder, tmp_path / "out") == 0
    written = (tmp_path / "out" / "tokenizer.json").read_text()
    assert written == (tiny_model_folder / "tokenizer.json").read_text()


def test_recover_after_a_default_prune_reuses_its_text(
    tiny_model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default path writes the dense model's text once: prune caches it, recover reads it
    (same settings, same weights fingerprint) instead of generating it again."""
    pruned = tmp_path / "pruned"
    argv = ["prune", "--model", str(tiny_model_folder), "--ratio", "0.3", "--selfgen-sequences"]
    assert main([*argv, "8", "--out", str(pruned)]) == 0

    def must_not_write(*args, **kwargs):
        raise AssertionError("recover generated text that prune had already written")

    monkeypatch.setattr("prunenet.analysis.selfgen.generate_own_text", must_not_write)
    out = tmp_path / "out"
    argv = ["recover", "--model", str(pruned), "--teacher", str(tiny_model_folder)]
    assert main([*argv, "--out", str(out), "--steps", "2", "--sequences", "8"]) == 0
    report = json.loads((out / RECOVER_REPORT_FILE).read_text())
    assert report["text"]["sequences"] == 8 and report["text"]["length"] == 256
    assert report["held_out_tokens"] == 2 * 256


def test_the_hidden_state_weight_is_passed_on_and_recorded(
    tiny_model_folder: Path, pruned_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert _recover(pruned_folder, tiny_model_folder, out, "--hidden-weight", "0.5") == 0
    assert json.loads((out / RECOVER_REPORT_FILE).read_text())["hidden_weight"] == 0.5


# ----- refusals, before any training ------------------------------------------------------------


def test_a_teacher_with_another_vocabulary_exits_2(
    pruned_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_training: None
) -> None:
    teacher = tmp_path / "other-vocab"
    tiny_model("llama", vocab_size=80).save_pretrained(teacher)
    err = _refused_with_exit_2(capsys, pruned_folder, teacher, tmp_path / "out")
    assert "vocabulary has 80 tokens" in err
    assert not (tmp_path / "out").exists()


def test_a_teacher_with_another_tokenizer_exits_2(
    tiny_model_folder: Path, pruned_folder: Path, tmp_path: Path, capsys, no_training: None
) -> None:
    teacher = tmp_path / "other-tokenizer"
    tiny_model("llama").save_pretrained(teacher)
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["extra"])  # one more token than the model's: another tokenizer
    tokenizer.save_pretrained(teacher)
    err = _refused_with_exit_2(capsys, pruned_folder, teacher, tmp_path / "out")
    assert "other ids" in err


@pytest.mark.parametrize("which", ["model", "teacher"])
def test_a_missing_folder_exits_2(
    tiny_model_folder: Path, pruned_folder: Path, tmp_path: Path, capsys, no_training, which
) -> None:
    missing = tmp_path / "missing"
    args = (missing, tiny_model_folder) if which == "model" else (pruned_folder, missing)
    err = _refused_with_exit_2(capsys, *args, tmp_path / "out")
    assert "does not exist" in err


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--steps", "0"),
        ("--rank", "0"),
        ("--lr", "-1"),
        ("--lr", "nan"),
        ("--hidden-weight", "-1"),
        ("--hidden-weight", "inf"),
        ("--budget-minutes", "0"),
        ("--budget-minutes", "nan"),
    ],  # fmt: skip
)
def test_impossible_settings_exit_2(
    tiny_model_folder: Path, tmp_path: Path, capsys, no_training, option, value
) -> None:
    out = tmp_path / "out"
    _refused_with_exit_2(capsys, tiny_model_folder, tiny_model_folder, out, option, value)


def test_a_single_sequence_exits_2(
    tiny_model_folder: Path, tmp_path: Path, capsys, no_training
) -> None:
    err = _refused_with_exit_2(
        capsys, tiny_model_folder, tiny_model_folder, tmp_path / "out", "--sequences", "1"
    )
    assert "at least 2 self-generated sequences" in err


def test_an_existing_out_without_overwrite_exits_2(
    tiny_model_folder: Path, pruned_folder: Path, tmp_path: Path, capsys, no_training
) -> None:
    (tmp_path / "out").mkdir()
    err = _refused_with_exit_2(capsys, pruned_folder, tiny_model_folder, tmp_path / "out")
    assert "--overwrite" in err


# ----- interruptions ----------------------------------------------------------------------------


def test_sigterm_during_training_leaves_nothing_at_out(
    tiny_model_folder: Path, pruned_folder: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    calls = []
    real_loss = distill_module.kl_loss

    def terminated_on_third_step(*args):
        calls.append(1)
        if len(calls) == 3:
            raise Terminated  # what the CLI's SIGTERM handler raises
        return real_loss(*args)

    monkeypatch.setattr(distill_module, "kl_loss", terminated_on_third_step)
    code = _recover(pruned_folder, tiny_model_folder, tmp_path / "out")
    assert code == 128 + signal.SIGTERM and len(calls) == 3
    assert "interrupted by SIGTERM" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no output, no staging folder


def test_ctrl_c_while_saving_leaves_nothing_at_out(
    tiny_model_folder: Path, pruned_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    write_text = Path.write_text

    def interrupted(path, *args, **kwargs):
        if path.name == recovery_saving.RECOVER_REPORT_FILE:
            raise KeyboardInterrupt  # after the weights, before the report: a half-written folder
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", interrupted)
    code = _recover(pruned_folder, tiny_model_folder, tmp_path / "out")
    assert code == 128 + signal.SIGINT
    assert list(tmp_path.iterdir()) == []  # no output, no staging folder


# ----- data-free --------------------------------------------------------------------------------


def test_default_recover_opens_no_dataset_file(
    tiny_model_folder: Path, pruned_folder: Path, tmp_path: Path
) -> None:
    """Same audit as the prune command's (tests/commands/test_prune_data_free.py): every file
    the recover command opens, in a fresh interpreter."""
    report, out = tmp_path / "probe.json", tmp_path / "out"
    # One torch thread, as in every test: two workers' 2-thread prunes on 2 cores run far slower.
    env = {"PRUNENET_NO_CACHE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    argv = ["recover", "--model", str(pruned_folder), "--teacher", str(tiny_model_folder),
            "--out", str(out), *QUICK]  # fmt: skip
    subprocess.run(
        [sys.executable, "-c", PROBE, str(report), *argv], check=True, env=env, timeout=300
    )
    probe = json.loads(report.read_text())
    assert probe["code"] == 0 and (out / RECOVER_REPORT_FILE).is_file()
    dataset_files = [
        p for p in probe["opened"] if any(m in p for m in DATASET_MARKERS) and ".dist-info" not in p
    ]
    assert dataset_files == [], dataset_files
    assert "olmo_eval" not in probe["modules"] and "datasets" not in probe["modules"]
    # The probe sees the files recover does open: both model folders' weights.
    assert any(str(pruned_folder) in p for p in probe["opened"])
    assert any(str(tiny_model_folder) in p for p in probe["opened"])


def test_full_recovery_from_the_command_line_records_its_method_and_learning_rate(
    tiny_model_folder: Path, pruned_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert _recover(pruned_folder, tiny_model_folder, out, "--method", "full") == 0
    report = json.loads((out / RECOVER_REPORT_FILE).read_text())
    assert report["method"] == "full" and report["lr"] == 1e-4
    assert not any("embed" in name for name in report["target_modules"])
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    pruned = AutoModelForCausalLM.from_pretrained(pruned_folder).eval()
    assert not torch.allclose(logits_of(reloaded), logits_of(pruned))


@pytest.mark.parametrize(
    ("extra", "steps", "budget"),
    [
        ([], 60, None),
        (["--budget-minutes", "30"], UNBOUNDED_STEPS, 30.0),
        (["--budget-minutes", "30", "--steps", "500"], 500, 30.0),
    ],
)
def test_a_time_budget_without_steps_has_no_step_cap(extra, steps, budget) -> None:
    args = build_parser().parse_args(["recover", "--model", "m", "--teacher", "t", "--out", "o",
                                      *extra])  # fmt: skip
    config = recovery_config(args)
    assert (config.steps, config.budget_minutes) == (steps, budget)


def test_a_time_budget_is_recorded_and_steps_cap_it(
    tiny_model_folder: Path, pruned_folder: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    assert _recover(pruned_folder, tiny_model_folder, out, "--budget-minutes", "10") == 0
    report = json.loads((out / RECOVER_REPORT_FILE).read_text())
    assert report["budget_minutes"] == 10.0 and report["steps"] == 4  # QUICK's --steps 4
    assert "steps for 10 minutes, at most 4" in capsys.readouterr().out
