"""`prunenet prune` end to end: reloadable output, ratio lists, and refusals with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_utils import PreTrainedModel

from prunenet.arch import ffn_width, supported_model_types
from prunenet.cli import main
from prunenet.compress import REPORT_FILE, keep_count
from tests.conftest import FFN_WIDTH, logits_of, tiny_model, tiny_tokenizer


def _prune(model: Path | str, out: Path, ratio: str = "0.5", *extra: str) -> int:
    argv = ["prune", "--model", str(model), "--ratio", ratio, "--scorer", "random"]
    return main([*argv, "--out", str(out), *extra])


def _refused_with_exit_2(capsys: pytest.CaptureFixture, *args, **kwargs) -> str:
    """Run `_prune`, expect exit code 2 (returned, or argparse's SystemExit); return stderr."""
    try:
        code = _prune(*args, **kwargs)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    return capsys.readouterr().err


# ----- success ----------------------------------------------------------------------------------


def test_prune_writes_a_folder_that_plain_from_pretrained_reloads(
    tiny_model_folder: Path, tmp_path: Path
) -> None:
    assert _prune(tiny_model_folder, tmp_path / "out") == 0

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert ffn_width(reloaded.config) == keep_count(FFN_WIDTH, 0.5)
    assert (tmp_path / "out" / REPORT_FILE).is_file()
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert not torch.equal(logits_of(reloaded), logits_of(tiny_model("llama")))


def test_prune_prints_a_summary_with_parameter_counts(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _prune(tiny_model_folder, tmp_path / "out")
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert f"{report['params_after']:,}" in printed
    assert f"{100 * report['params_removed_fraction']:.1f}%" in printed


def test_ratio_list_writes_one_reloadable_subfolder_per_ratio(
    tiny_model_folder: Path, tmp_path: Path
) -> None:
    assert _prune(tiny_model_folder, tmp_path / "out", "0.1,0.2") == 0

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ratio-0.10", "ratio-0.20"]
    for name, ratio in [("ratio-0.10", 0.1), ("ratio-0.20", 0.2)]:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / name)
        assert ffn_width(reloaded.config) == keep_count(FFN_WIDTH, ratio)


def test_same_seed_writes_identical_weights_and_another_seed_different_ones(
    tiny_model_folder: Path, tmp_path: Path
) -> None:
    for name, seed in [("a", "1"), ("b", "1"), ("c", "2")]:
        assert _prune(tiny_model_folder, tmp_path / name, "0.5", "--seed", seed) == 0
    a, b, c = (AutoModelForCausalLM.from_pretrained(tmp_path / n) for n in "abc")
    assert torch.equal(logits_of(a), logits_of(b))
    assert not torch.equal(logits_of(a), logits_of(c))


def test_overwrite_replaces_an_existing_output(tiny_model_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    assert _prune(tiny_model_folder, out, "0.5", "--overwrite") == 0
    assert not (out / "old.txt").exists()
    assert (out / "config.json").is_file()


def test_console_script_prints_help() -> None:
    script = shutil.which("prunenet", path=str(Path(sys.executable).parent))
    assert script is not None, "the prunenet console script is not installed next to python"
    result = subprocess.run(
        [script, "--help"], capture_output=True, text=True, timeout=120, env=os.environ.copy()
    )
    assert result.returncode == 0
    assert "prune" in result.stdout


# ----- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", ["0", "-0.2"])
def test_ratio_at_or_below_zero_exits_2_with_a_message(
    ratio: str, tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = _refused_with_exit_2(capsys, tiny_model_folder, tmp_path / "out", ratio)
    assert "outside (0, 1)" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ratio", ["1", "1.5"])
def test_ratio_at_or_above_one_exits_2_with_a_message(
    ratio: str, tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = _refused_with_exit_2(capsys, tiny_model_folder, tmp_path / "out", ratio)
    assert "outside (0, 1)" in err
    assert not (tmp_path / "out").exists()


def test_non_numeric_ratio_exits_2_with_a_message(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = _refused_with_exit_2(capsys, tiny_model_folder, tmp_path / "out", "thirty")
    assert "not a number" in err


def test_nan_ratio_exits_2_with_a_message(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = _refused_with_exit_2(capsys, tiny_model_folder, tmp_path / "out", "nan")
    assert "outside (0, 1)" in err


def test_repeated_ratio_in_a_list_exits_2_with_a_message(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = _refused_with_exit_2(capsys, tiny_model_folder, tmp_path / "out", "0.3,0.30")
    assert "repeat a value" in err
    assert not (tmp_path / "out").exists()


def test_ratio_that_leaves_no_rows_exits_2_before_writing_anything(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = _refused_with_exit_2(capsys, tiny_model_folder, tmp_path / "out", "0.2,0.99")
    assert "would remove all" in err
    assert not (tmp_path / "out").exists()


def test_unknown_model_type_exits_2_listing_the_supported_types(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = AutoConfig.for_model("bloom", vocab_size=64, hidden_size=16, n_layer=2, n_head=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "bloom")
    tiny_tokenizer().save_pretrained(tmp_path / "bloom")

    err = _refused_with_exit_2(capsys, tmp_path / "bloom", tmp_path / "out")
    assert "'bloom'" in err
    assert all(model_type in err for model_type in supported_model_types())
    assert not (tmp_path / "out").exists()


def test_missing_model_path_exits_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = _refused_with_exit_2(capsys, tmp_path / "no-such-model", tmp_path / "out")
    assert "does not exist" in err


def test_model_folder_without_config_json_exits_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "empty").mkdir()
    err = _refused_with_exit_2(capsys, tmp_path / "empty", tmp_path / "out")
    assert "no config.json" in err


def test_existing_output_is_refused_without_overwrite(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    err = _refused_with_exit_2(capsys, tiny_model_folder, out)
    assert "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]


def test_crash_while_saving_leaves_no_output_and_no_staging_folder(
    tiny_model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = PreTrainedModel.save_pretrained

    def save_then_crash(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        _prune(tiny_model_folder, tmp_path / "parent" / "out")
    assert list((tmp_path / "parent").iterdir()) == []
