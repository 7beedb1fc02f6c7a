"""`prunenet prune` and what it writes around its outputs: an unusable cache, several folders
under one `--out` (resumable after an interruption)."""

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

from prunenet import runner
from prunenet.cli import main
from prunenet.io.cache import CacheWarning
from prunenet.io.saving import REQUEST_FILE

QUICK = ("--selfgen-sequences", "8", "--selfgen-length", "12")


def _prune(model: Path, out: Path, *extra: str) -> int:
    return main(["prune", "--model", str(model), "--out", str(out), *QUICK, *extra])


def test_a_cache_path_that_is_a_file_warns_and_the_run_succeeds(
    tiny_model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cache").write_text("a file")
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PRUNENET_NO_CACHE", raising=False)
    with pytest.warns(CacheWarning, match="Going on without the cache"):
        assert _prune(tiny_model_folder, tmp_path / "out", "--ratio", "0.5") == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "cache").read_text() == "a file"


# ----- several folders under one --out: resumable ------------------------------------------------


def _stamps(folder: Path) -> dict[str, int]:
    """Each file's modification time: unchanged files were not written again."""
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_sigterm_after_the_first_subfolder_keeps_it_and_a_rerun_writes_only_the_rest(
    tiny_model_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = ["prune", "--model", str(tiny_model_folder), "--ratio", "0.2,0.5", "--out", str(out),
            *QUICK]  # fmt: skip
    env = {**os.environ, "PRUNENET_CACHE": str(tmp_path / "cache")}
    env.pop("PRUNENET_NO_CACHE", None)
    run = subprocess.Popen([sys.executable, "-c", _SLOW_SAVES, *argv], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "ratio-0.20").is_dir():
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.05)
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 128 + signal.SIGTERM
    assert f"finished before the interruption (complete, kept): {out / 'ratio-0.20'}" in stderr
    assert f"not written: {out / 'ratio-0.50'}" in stderr
    assert "Rerun the same command to resume" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["ratio-0.20"]  # no staging, no lock
    finished = _stamps(out / "ratio-0.20")

    rerun = subprocess.run([sys.executable, "-m", "prunenet.cli", *argv], env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert f"{out / 'ratio-0.20'}: skipped (already complete)" in rerun.stdout
    assert _stamps(out / "ratio-0.20") == finished
    assert (out / "ratio-0.50" / "model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["ratio-0.20", "ratio-0.50"]


# Runs the CLI (argv[1:]) with every save followed by a minute's pause: time to interrupt it
# between the first folder and the second.
_SLOW_SAVES = """
import sys, time
import prunenet.pipeline as pipeline
from prunenet.cli import main
real_save = pipeline.save_pruned
def save_then_pause(*args, **kwargs):
    real_save(*args, **kwargs)
    time.sleep(60)
pipeline.save_pruned = save_then_pause
sys.exit(main(sys.argv[1:]))
"""


def test_a_rerun_of_a_finished_budget_list_skips_every_folder_without_loading_the_model(
    tiny_model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("PRUNENET_NO_CACHE", "1")
    out = tmp_path / "out"
    assert _prune(tiny_model_folder, out, "--remove-params", "0.1,0.2") == 0
    stamps = {name: _stamps(out / name) for name in ("params-0.10", "params-0.20")}
    capsys.readouterr()
    monkeypatch.setattr(runner, "load_model", _no_loading)
    assert _prune(tiny_model_folder, out, "--remove-params", "0.1,0.2") == 0
    assert capsys.readouterr().out.count("skipped (already complete)") == 2
    assert {name: _stamps(out / name) for name in stamps} == stamps


def test_a_rerun_writes_a_missing_budget_folder_and_skips_the_complete_one(
    tiny_model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("PRUNENET_NO_CACHE", "1")
    out, requests = tmp_path / "out", tmp_path / "requests.txt"
    requests.write_text("0.1\n0.2\n")
    assert _prune(tiny_model_folder, out, "--requests", str(requests)) == 0
    shutil.rmtree(out / "params-0.20")  # as if the run had been stopped before it
    kept = _stamps(out / "params-0.10")
    capsys.readouterr()
    assert _prune(tiny_model_folder, out, "--requests", str(requests)) == 0
    assert f"{out / 'params-0.10'}: skipped (already complete)" in capsys.readouterr().out
    assert _stamps(out / "params-0.10") == kept
    assert (out / "params-0.20" / "model.safetensors").is_file()


def test_a_subfolder_of_another_request_is_refused_before_any_work_without_overwrite(
    tiny_model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("PRUNENET_NO_CACHE", "1")
    out = tmp_path / "out"
    assert _prune(tiny_model_folder, out, "--ratio", "0.2,0.5") == 0
    before = _stamps(out / "ratio-0.20")
    capsys.readouterr()
    monkeypatch.setattr(runner, "load_model", _no_loading)
    assert _prune(tiny_model_folder, out, "--ratio", "0.2,0.5", "--seed", "1") == 2
    error = capsys.readouterr().err
    assert "is not this request's finished output" in error and "seed 0 there, 1 now" in error
    assert _stamps(out / "ratio-0.20") == before


def test_overwrite_replaces_the_subfolders_of_another_request(
    tiny_model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRUNENET_NO_CACHE", "1")
    out = tmp_path / "out"
    assert _prune(tiny_model_folder, out, "--ratio", "0.2,0.5") == 0
    assert _prune(tiny_model_folder, out, "--ratio", "0.2,0.5", "--seed", "1", "--overwrite") == 0
    for name in ("ratio-0.20", "ratio-0.50"):
        record = json.loads((out / name / REQUEST_FILE).read_text())
        assert record["request"]["seed"] == 1


def test_a_subfolder_that_is_not_a_model_folder_is_never_replaced(
    tiny_model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "out"
    (out / "ratio-0.20").mkdir(parents=True)
    (out / "ratio-0.20" / "notes.txt").write_text("mine")
    monkeypatch.setattr(runner, "load_model", _no_loading)
    assert _prune(tiny_model_folder, out, "--ratio", "0.2,0.5", "--overwrite") == 2
    assert "never replaces other folders" in capsys.readouterr().err
    assert (out / "ratio-0.20" / "notes.txt").read_text() == "mine"


def test_an_existing_out_holding_other_files_is_refused_without_overwrite(
    tiny_model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("my thesis")
    monkeypatch.setattr(runner, "load_model", _no_loading)
    assert _prune(tiny_model_folder, out, "--ratio", "0.2,0.5") == 2
    assert "holds other things than this run's subfolders (thesis.tex)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def _no_loading(*args, **kwargs):
    raise AssertionError("the model was loaded, though nothing needed it")
