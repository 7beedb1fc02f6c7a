"""The recovered model's folder: complete or absent, like every PruneNet output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import PreTrainedModel

from prunenet.io.saving import REPORT_FILE, atomic_directory

RECOVER_REPORT_FILE = "prunenet_recover_report.json"


def save_recovered(
    model: PreTrainedModel,
    tokenizer,
    out: str | Path,
    report: dict,
    source: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Save the merged model, tokenizer and `prunenet_recover_report.json` atomically: nothing
    appears at `out` unless everything was written (`prunenet.io.saving.atomic_directory`).

    :param model: the merged model (`merge_adapters`).
    :param tokenizer: the tokenizer to copy, or None (then the folder has none).
    :param out: the destination folder.
    :param report: JSON-able record of the run.
    :param source: the pruned input folder; its `prunenet_report.json` (what the pruning did:
        per-layer widths, scorer) is copied along, since the recovered model has the same shapes.
    :param overwrite: replace an existing `out`.
    """
    out = Path(out).expanduser()
    with atomic_directory(out, overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        prune_report = Path(source) / REPORT_FILE if source is not None else None
        if prune_report is not None and prune_report.is_file():
            shutil.copyfile(prune_report, staging / REPORT_FILE)
        (staging / RECOVER_REPORT_FILE).write_text(json.dumps(report, indent=2))
    return out
