"""Stage timings of a prune run: each stage's wall seconds add up, the own text says whether it
was written or read from the cache, and the saved report carries every stage, save included."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import prunenet
from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.analysis.sequential import analysis_text
from prunenet.io.saving import REPORT_FILE
from prunenet.pipeline import prune_and_save, prune_budgets_and_save, scorer_planner
from prunenet.scoring.heuristics import RandomScorer, SelfGenScorer
from prunenet.stages import StageTimes, peak_rss_mb
from tests.conftest import tiny_model, tiny_tokenizer

TEXT = SelfGenConfig(sequences=4, length=16, seed=0)


def test_a_stage_timed_twice_adds_up() -> None:
    times = StageTimes()
    for _ in range(2):
        with times.timing("cut"):
            time.sleep(0.01)
    assert times.seconds["cut"] >= 0.02


def test_the_own_text_is_generated_first_and_read_from_the_cache_after() -> None:
    model = tiny_model("llama")
    sources = []
    for _ in range(2):
        times = StageTimes()
        with times.own_text():
            analysis_text(model, TEXT)
        sources.append(times.text)
    assert sources == ["generated", "cache"]


def test_the_own_text_counts_as_generated_with_the_cache_off(no_disk_cache) -> None:
    times = StageTimes()
    with times.own_text():
        analysis_text(tiny_model("llama"), TEXT)
    assert times.text == "generated"


def test_a_fork_keeps_the_run_stages_and_leaves_the_run_alone() -> None:
    run = StageTimes({"load": 1.0}, "cache", {"load": 900.0})
    folder = run.fork()
    folder.seconds["cut"] = 2.0
    folder.peak_rss_mb["cut"] = 1000.0
    assert folder.to_dict() == {
        "seconds": {"load": 1.0, "cut": 2.0},
        "text": "cache",
        "peak_rss_mb": {"load": 900.0, "cut": 1000.0},
    }
    assert run.seconds == {"load": 1.0} and run.peak_rss_mb == {"load": 900.0}


@pytest.mark.skipif(peak_rss_mb() is None, reason="the system reports no peak memory")
def test_a_stage_that_allocates_raises_the_peak_recorded_at_its_end() -> None:
    times = StageTimes()
    with times.timing("small"):
        pass
    with times.timing("large"):
        # More than the whole peak so far (a test worker may have peaked higher before), touched.
        block = torch.ones(int((times.peak_rss_mb["small"] + 250) * 1e6), dtype=torch.uint8)
        del block
    assert times.peak_rss_mb["large"] >= times.peak_rss_mb["small"] + 250


def saved_report(folder: Path) -> dict:
    return json.loads((folder / REPORT_FILE).read_text())


def test_the_saved_report_has_every_stage_and_the_total_seconds(tmp_path: Path) -> None:
    planner = scorer_planner(SelfGenScorer(seed=0), analysis="sequential")
    folders = [tmp_path / "a", tmp_path / "b"]
    prune_and_save(tiny_model("llama"), tiny_tokenizer(), planner, [0.25, 0.5], folders,
                   refit="lsq", selfgen=TEXT, stages=StageTimes({"load": 0.5}))  # fmt: skip
    first, second = (saved_report(folder) for folder in folders)
    assert list(first["stages"]["seconds"]) == ["load", "text", "cut", "save"]
    assert first["stages"]["text"] == "generated"
    assert all(value > 0 for value in first["stages"]["seconds"].values())
    assert first["seconds"] > 0  # the total, known only after the save
    # The text is written once; the second folder's report repeats the run's stages.
    assert second["stages"]["seconds"]["text"] == first["stages"]["seconds"]["text"]
    assert second["stages"]["seconds"]["cut"] != first["stages"]["seconds"]["cut"]


def test_a_cut_that_reads_no_text_records_none(tmp_path: Path) -> None:
    planner = scorer_planner(RandomScorer(seed=0))
    prune_and_save(tiny_model("llama"), None, planner, [0.3], [tmp_path / "a"])
    stages = saved_report(tmp_path / "a")["stages"]
    assert stages["text"] == "none"
    assert list(stages["seconds"]) == ["cut", "save"]


def test_a_parameter_budget_report_has_the_text_cut_and_save(tmp_path: Path) -> None:
    planner = scorer_planner(SelfGenScorer(seed=0), analysis="sequential")
    prune_budgets_and_save(tiny_model("llama"), tiny_tokenizer(), planner, [0.05], ("ffn",),
                           [tmp_path / "a"], refit="lsq", selfgen=TEXT)  # fmt: skip
    stages = saved_report(tmp_path / "a")["stages"]
    assert list(stages["seconds"]) == ["text", "cut", "save"]


def test_prune_records_the_load_first_in_the_report_it_returns_and_saves(
    tiny_model_folder: Path, tmp_path: Path
) -> None:
    (result,) = prunenet.prune(str(tiny_model_folder), tmp_path / "out", ratio=(0.3,),
                               text_sequences=4, text_length=16)  # fmt: skip
    assert list(result.report.stages["seconds"]) == ["load", "text", "cut", "save"]
    assert saved_report(tmp_path / "out")["stages"] == result.report.stages
