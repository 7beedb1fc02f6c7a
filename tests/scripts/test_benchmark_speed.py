"""scripts/benchmark_speed.py: both sides measured as child processes, the table and the JSON
written, and bad input refused with exit 2 before any run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prunenet.errors import PruneNetError
from tests.conftest import load_script

TINY = "--ratio 0.3 --text 4x16"


@pytest.fixture(scope="module")
def speed():
    yield load_script("benchmark_speed")
    sys.modules.pop("benchmark_speed", None)


def worktrees() -> str:
    return subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parents[2]), "worktree", "list"],
        capture_output=True,
        text=True,
    ).stdout


def test_a_tiny_run_measures_both_sides_and_writes_the_table_and_json(
    speed, tiny_model_folder, tmp_path, capsys
):
    trees_before = worktrees()
    argv = ["--model", str(tiny_model_folder), "--command", TINY, "--base", "HEAD", "--modes",
            "cold", "--repeats", "1", "--no-eval", "--out-dir", str(tmp_path)]  # fmt: skip
    assert speed.main(argv) == 0
    record = json.loads((tmp_path / "benchmark_speed.json").read_text())
    runs = record["runs"]
    assert sorted(run["side"] for run in runs) == ["base", "new"]
    for run in runs:
        assert run["wall_seconds"] > 0 and run["user_seconds"] > 0
        assert run["peak_rss_bytes"] > 50e6  # a Python that loaded torch
        assert Path(run["folders"][0], "model.safetensors").is_file()  # outputs kept
    new = next(run for run in runs if run["side"] == "new")
    assert list(new["stages"]) == ["load", "text", "cut", "save"]
    assert new["text"] == "generated"
    assert new["threads"] >= 1  # read from the folder's prunenet_request.json
    assert list(new["stage_peak_mb"]) == ["load", "text", "cut", "save"]
    # The child's own peak bounds its stages' (recorded to 0.1 MB).
    assert new["stage_peak_mb"]["save"] * 1e6 <= new["peak_rss_bytes"] + 0.05e6
    printed = capsys.readouterr().out
    assert "| base | cold | 1 |" in printed and "| new | cold | 1 |" in printed
    assert "cold: new/base wall" in printed
    assert (tmp_path / "benchmark_speed.md").read_text() in printed
    assert f"- new cold #{new['index']} r{new['repeat']}: load " in printed
    # The base's worktree is removed (a stale one from an earlier, killed run may remain).
    assert worktrees() == trees_before


def test_a_bad_base_exits_2_before_any_run(speed, tiny_model_folder, tmp_path, capsys):
    argv = ["--model", str(tiny_model_folder), "--base", "no-such-revision", "--out-dir",
            str(tmp_path)]  # fmt: skip
    assert speed.main(argv) == 2
    assert "--base 'no-such-revision' is not a commit" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_missing_model_exits_2(speed, tmp_path, capsys):
    assert speed.main(["--model", str(tmp_path / "none"), "--no-base"]) == 2
    assert "neither a local model folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "message"),
    [("--ratio 0.3 --out x", "must not name --out"), ("--ratoi 0.3", "refused by `prunenet")],
)
def test_a_bad_command_exits_2(speed, tiny_model_folder, command, message, capsys):
    argv = ["--model", str(tiny_model_folder), "--command", command, "--no-base"]
    assert speed.main(argv) == 2
    assert message in capsys.readouterr().err


def test_an_option_the_base_lacks_is_refused_before_any_run(speed):
    head = speed.resolve_base("HEAD")
    speed.check_base_options(head, ["--ratio", "0.3", "--no-update-card"])  # known: no error
    with pytest.raises(PruneNetError, match="--brand-new-flag"):
        speed.check_base_options(head, ["--brand-new-flag"])


def test_sides_alternate_and_flip_every_repeat_with_warm_after_cold(speed):
    order = speed.schedule(["base", "new"], ["cold", "warm"], 2)
    assert order == [
        (1, "base", "cold"), (1, "new", "cold"), (1, "base", "warm"), (1, "new", "warm"),
        (2, "new", "cold"), (2, "base", "cold"), (2, "new", "warm"), (2, "base", "warm"),
    ]  # fmt: skip


def test_a_side_without_stages_prints_n_a(speed):
    run = {"wall_seconds": 2.0, "user_seconds": 1.0, "system_seconds": 0.5,
           "peak_rss_bytes": 10**9, "stages": None, "text": None, "cut_parts": None,
           "perplexity": None, "threads": None}  # fmt: skip
    cells = speed.row("base", "cold", [run], "1")
    assert cells[4:8] == ["2.00", "1.00", "0.50", "1.00"]
    assert cells[3] == "n/a" and cells[8:] == ["n/a"] * (len(speed.HEADERS) - 8)


def test_a_child_refuses_to_run_a_prunenet_of_another_tree(speed, tmp_path):
    env = speed.child_env(tmp_path, tmp_path / "cache")  # PYTHONPATH: a tree without prunenet
    done = subprocess.run([sys.executable, "-P", "-c", speed.LAUNCH, "prune"], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1
    assert f"not {tmp_path.resolve()}" in done.stderr


def test_the_new_side_is_a_copy_of_the_working_tree(speed, tmp_path):
    tree = speed.snapshot(tmp_path / "tree")
    source = Path(speed.__file__).resolve()
    assert (tree / "scripts" / source.name).read_bytes() == source.read_bytes()
    assert (tree / "prunenet" / "cli.py").is_file()
