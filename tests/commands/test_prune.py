"""`prunenet prune` end to end: reloadable output, ratio lists, and refusals with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_utils import PreTrainedModel

from prunenet import runner
from prunenet.cli import main
from prunenet.core.arch import supported_model_types
from prunenet.core.config_fields import ffn_width
from prunenet.core.ratios import keep_count
from prunenet.io import saving
from prunenet.io.saving import REPORT_FILE
from prunenet.scoring.heuristics import RandomScorer
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
    (out / "config.json").write_text("{}")  # a model folder: what --overwrite may replace
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
    assert "more than once" in err
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


# ----- trust: every bad input exits 2 before work, one run per --out, nothing left behind -------


def _broken_copy(source: Path, target: Path, weights: bytes | None) -> Path:
    shutil.copytree(source, target)
    if weights is not None:
        data = (target / "model.safetensors").read_bytes()
        (target / "model.safetensors").write_bytes(weights if weights else data[: len(data) // 2])
    return target


@pytest.mark.parametrize("weights", [b"", b"garbage" * 10], ids=["truncated", "garbage"])
def test_unreadable_safetensors_exits_2_with_a_message(
    weights: bytes, tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    broken = _broken_copy(tiny_model_folder, tmp_path / "broken", weights)
    err = _refused_with_exit_2(capsys, broken, tmp_path / "out")
    assert "truncated or corrupt" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_threads_below_one_exits_2(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = _refused_with_exit_2(capsys, tiny_model_folder, tmp_path / "out", "0.5", "--threads", "0")
    assert "--threads" in err and "at least 1" in err


@pytest.mark.parametrize("value", ["nan", "inf", "0", "0.95"])
def test_bad_max_layer_ratio_exits_2_before_the_model_is_loaded(
    value: str,
    tiny_model_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner, "load_model", _must_not_be_called)
    err = _refused_with_exit_2(
        capsys, tiny_model_folder, tmp_path / "out", "0.3", "--allocation", "auto",
        "--max-layer-ratio", value,
    )  # fmt: skip
    assert "--max-layer-ratio" in err


def test_full_disk_exits_2_before_any_scoring(
    tiny_model_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(saving.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 0))
    monkeypatch.setattr(RandomScorer, "score_layer", _must_not_be_called)
    err = _refused_with_exit_2(capsys, tiny_model_folder, tmp_path / "out")
    assert "free some space" in err
    assert list(tmp_path.iterdir()) == []


def test_output_under_a_file_exits_2_before_the_model_is_loaded(
    tiny_model_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(runner, "load_model", _must_not_be_called)
    err = _refused_with_exit_2(capsys, tiny_model_folder, tmp_path / "file" / "out")
    assert "is a file, not a folder" in err


def test_ratio_that_removes_no_row_warns_that_the_output_is_a_full_copy(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert _prune(tiny_model_folder, tmp_path / "out", "0.0001") == 0
    err = capsys.readouterr().err
    assert "removes no row" in err and "full-size copy" in err


def test_model_folder_without_tokenizer_files_is_pruned_and_reloads(
    tiny_model_folder: Path, tmp_path: Path
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_model_folder / name).is_file():
            shutil.copy(tiny_model_folder / name, bare / name)
    assert _prune(bare, tmp_path / "out") == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert ffn_width(reloaded.config) == keep_count(FFN_WIDTH, 0.5)
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_two_concurrent_prunes_to_one_out_exactly_one_succeeds(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, flag = tmp_path / "out", tmp_path / "go"
    first = _start_cli(_WAIT_IN_SCORER, flag, _argv(tiny_model_folder, out))
    try:
        _wait_for(lambda: (tmp_path / ".out.lock").exists() and first.poll() is None)
        err = _refused_with_exit_2(capsys, tiny_model_folder, out)
        assert "Another prunenet run" in err
    finally:
        flag.touch()
        first.wait(timeout=120)
    assert first.returncode == 0, first.stderr.read()
    assert (out / REPORT_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "out"]


def test_run_killed_mid_save_leaves_nothing_a_later_run_trips_over(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, flag = tmp_path / "out", tmp_path / "saved"
    killed = _start_cli(_STOP_AFTER_WEIGHTS, flag, _argv(tiny_model_folder, out))
    _wait_for(flag.exists)
    killed.kill()
    killed.wait(timeout=60)
    assert any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir())

    assert _prune(tiny_model_folder, out) == 0
    assert ".out.partial-" in capsys.readouterr().err  # the cleanup is reported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "saved"]
    AutoModelForCausalLM.from_pretrained(out)


def test_sigterm_mid_save_cleans_up_like_ctrl_c(tiny_model_folder: Path, tmp_path: Path) -> None:
    out, flag = tmp_path / "out", tmp_path / "saved"
    terminated = _start_cli(_STOP_AFTER_WEIGHTS, flag, _argv(tiny_model_folder, out))
    _wait_for(flag.exists)
    terminated.send_signal(signal.SIGTERM)
    terminated.wait(timeout=60)
    assert terminated.returncode == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM" in terminated.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("ran although the input should have been refused first")


def _argv(model: Path, out: Path) -> list[str]:
    return [
        "prune",
        "--model",
        str(model),
        "--ratio",
        "0.5",
        "--scorer",
        "random",
        "--out",
        str(out),
    ]


def _start_cli(prelude: str, flag: Path, argv: list[str]) -> subprocess.Popen:
    """`prunenet` in a subprocess, with `prelude` patching it first (it reads FLAG)."""
    code = prelude + "\nfrom prunenet.cli import main\nsys.exit(main(sys.argv[2:]))\n"
    return subprocess.Popen(
        [sys.executable, "-c", code, str(flag), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PRUNENET_NO_CACHE": "1"},
    )


def _wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the subprocess never got there"
        time.sleep(0.05)


# The scorer waits until FLAG exists: the run holds --out meanwhile.
_WAIT_IN_SCORER = """
import sys, time
from pathlib import Path
from prunenet.scoring.heuristics import RandomScorer
real = RandomScorer.score_layer
def wait_then_score(self, *args, **kwargs):
    while not Path(sys.argv[1]).exists():
        time.sleep(0.02)
    return real(self, *args, **kwargs)
RandomScorer.score_layer = wait_then_score
"""

# The save writes the weights into the staging folder, creates FLAG, and hangs (to be killed).
_STOP_AFTER_WEIGHTS = """
import sys, time
from pathlib import Path
from transformers.modeling_utils import PreTrainedModel
real = PreTrainedModel.save_pretrained
def save_then_hang(self, folder, *args, **kwargs):
    real(self, folder, *args, **kwargs)
    Path(sys.argv[1]).touch()
    while True:
        time.sleep(0.05)
PreTrainedModel.save_pretrained = save_then_hang
"""


# ----- --refit ----------------------------------------------------------------------------------


def test_refit_lsq_writes_a_folder_that_plain_from_pretrained_reloads(
    tiny_model_folder: Path, tmp_path: Path, no_disk_cache: None
) -> None:
    out = tmp_path / "out"
    assert _prune(tiny_model_folder, out, "0.3", "--refit", "lsq", "--refit-sequences", "4") == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.mlp_bias is True
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["scorer"]["sequential"]["mode"] == "lsq"


def test_refit_with_stream_exits_2_before_the_model_is_loaded(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = _refused_with_exit_2(
        capsys, tiny_model_folder, tmp_path / "out", "0.3", "--refit", "lsq", "--stream"
    )
    assert "needs the model in memory" in err and "--refit none" in err
    assert not (tmp_path / "out").exists()


def test_refit_bias_on_a_model_without_output_bias_exits_2_naming_lsq(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "qwen2"
    tiny_model("qwen2").save_pretrained(folder)
    err = _refused_with_exit_2(capsys, folder, tmp_path / "out", "0.3", "--refit", "bias")
    assert "cannot store" in err and "--refit lsq" in err


# ----- --analysis -------------------------------------------------------------------------------


def test_sequential_analysis_writes_a_folder_that_plain_from_pretrained_reloads(
    tiny_model_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    extra = ("--scorer", "selfgen", "--analysis", "sequential", "--selfgen-sequences", "4")
    assert _prune(tiny_model_folder, out, "0.3", *extra) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.intermediate_size == keep_count(FFN_WIDTH, 0.3)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["scorer"]["analysis"] == "sequential"
    assert report["scorer"]["sequential"]["scored"] == "sequential"


def test_sequential_analysis_picks_other_rows_than_one_shot(
    tiny_model_folder: Path, tmp_path: Path
) -> None:
    def down_proj(folder: Path) -> torch.Tensor:
        return AutoModelForCausalLM.from_pretrained(folder).model.layers[1].mlp.down_proj.weight

    common = ("--scorer", "selfgen", "--selfgen-sequences", "4", "--refit", "none")
    assert (
        _prune(tiny_model_folder, tmp_path / "seq", "0.5", *common, "--analysis", "sequential") == 0
    )
    assert _prune(tiny_model_folder, tmp_path / "one", "0.5", *common, "--analysis", "oneshot") == 0
    assert not torch.equal(down_proj(tmp_path / "seq"), down_proj(tmp_path / "one"))


def test_sequential_analysis_with_a_weights_only_scorer_exits_2_before_loading(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = _refused_with_exit_2(
        capsys, tiny_model_folder, tmp_path / "out", "0.3", "--analysis", "sequential"
    )
    assert "reads only weights" in err and "--analysis oneshot" in err
    assert not (tmp_path / "out").exists()


def test_sequential_analysis_with_stream_exits_2(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    extra = ("--scorer", "selfgen", "--analysis", "sequential", "--stream")
    err = _refused_with_exit_2(capsys, tiny_model_folder, tmp_path / "out", "0.3", *extra)
    assert "needs the model" in err and "--analysis oneshot" in err


@pytest.mark.parametrize(("scorer", "analysis"), [("selfgen", "sequential"), ("random", "oneshot")])
def test_in_memory_defaults_are_the_lsq_refit_and_sequential_analysis_where_it_applies(
    tiny_model_folder: Path, tmp_path: Path, scorer: str, analysis: str
) -> None:
    out = tmp_path / "out"
    assert (
        _prune(tiny_model_folder, out, "0.3", "--scorer", scorer, "--selfgen-sequences", "4") == 0
    )
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["scorer"]["analysis"] == analysis
    assert report["scorer"]["sequential"]["mode"] == "lsq"


def test_stream_defaults_to_the_plain_one_shot_cut(tiny_model_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _prune(tiny_model_folder, out, "0.3", "--stream") == 0
    report = json.loads((out / REPORT_FILE).read_text())
    assert "sequential" not in report["scorer"]


# ----- --remove-params --------------------------------------------------------------------------


def _budget(model: Path | str, out: Path, *extra: str) -> int:
    argv = ["prune", "--model", str(model), "--scorer", "magnitude", "--out", str(out)]
    try:
        return main([*argv, *extra])
    except SystemExit as exit_:
        return exit_.code


def test_remove_params_writes_a_reloadable_folder_that_says_where_the_parameters_went(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    code = _budget(tiny_model_folder, out, "--remove-params", "0.2", "--structures",
                   "ffn,layers", "--selfgen-sequences", "4")  # fmt: skip
    assert code == 0
    report = json.loads((out / REPORT_FILE).read_text())
    split = report["structures"]
    assert split["target"] == 0.2 and split["removed_fraction"] >= 0.2
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    dense = tiny_model("llama")
    # The refit's new biases are counted in the split: the arithmetic is exact.
    assert reloaded.config.mlp_bias is True
    assert reloaded.num_parameters() == dense.num_parameters() - split["params_removed"]
    assert "params target" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--ratio", "0.3", "--remove-params", "0.2"), "not allowed with"),
        (("--ratio", "0.3", "--structures", "heads"), "needs --remove-params"),
        (
            ("--remove-params", "0.2", "--structures", "ffn,heads", "--stream"),
            "needs the model in memory",
        ),
        (("--remove-params", "0.2", "--allocation", "auto"), "--ratio only"),
        (("--remove-params", "0.2", "--structures", "ffn,experts"), "Unknown structure"),
        (("--remove-params", "0.97", "--structures", "layers"), "can remove at most"),
    ],
)
def test_bad_budget_requests_exit_2_with_a_message(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra, message
) -> None:
    assert _budget(tiny_model_folder, tmp_path / "out", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_heads_of_an_architecture_that_cannot_lose_them_exit_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "falcon-alibi"
    tiny_model("falcon", alibi=True).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    code = _budget(folder, tmp_path / "out", "--remove-params", "0.2", "--structures", "heads")
    assert code == 2
    assert "falcon heads cannot be removed: falcon with alibi" in capsys.readouterr().err
