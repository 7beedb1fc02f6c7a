"""`prunenet prune --target-speedup S`: the ratio is found by timing, then pruned as --ratio."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from prunenet.allocation import speedup
from prunenet.cli import main
from prunenet.io.saving import REPORT_FILE

SMALL_TEXT = ("--selfgen-sequences", "4", "--selfgen-length", "16")


def _prune(model: Path, out: Path, *extra: str) -> int:
    argv = ["prune", "--model", str(model), "--out", str(out), *SMALL_TEXT, *extra]
    return main(argv)


def test_the_found_ratio_is_pruned_and_recorded(
    tiny_model_folder, tmp_path, monkeypatch, no_disk_cache
):
    shaped: list[float] = []
    real = speedup._shaped_like_cut
    monkeypatch.setattr(speedup, "_shaped_like_cut", lambda m, r: shaped.append(r) or real(m, r))
    monkeypatch.setattr(speedup, "compare_runners",
                        lambda *a, **k: SimpleNamespace(paired_speedup=1 + shaped[-1]))  # fmt: skip
    out = tmp_path / "out"
    assert _prune(tiny_model_folder, out, "--target-speedup", "1.4") == 0
    report = json.loads((out / REPORT_FILE).read_text())
    search = report["scorer"]["target_speedup"]
    assert search["target"] == 1.4 and search["speedup"] >= 1.4
    assert report["target_ratio"] == search["ratio"]
    assert 0.4 <= search["ratio"] < 0.42


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (("--target-speedup", "0.9"), "must be above 1"),
        (("--target-speedup", "1.2", "--layerwise"), "with --route memory or auto"),
    ],
)
def test_bad_speed_targets_exit_2(tiny_model_folder, tmp_path, capsys, extra, says):
    assert _prune(tiny_model_folder, tmp_path / "out", *extra) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
