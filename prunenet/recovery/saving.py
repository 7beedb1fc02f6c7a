"""The recovered model's folder: complete or absent, like every PruneNet output."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedModel

from prunenet.io.saving import REPORT_FILE, save_model_folder

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
    appears at `out` unless everything was written (`prunenet.io.saving.save_model_folder`).

    :param model: the merged model (`merge_adapters`).
    :param tokenizer: the tokenizer to copy, or None (then the folder has none).
    :param out: the destination folder.
    :param report: JSON-able record of the run.
    :param source: the pruned input folder; its `prunenet_report.json` (what the pruning did:
        per-layer widths, scorer) is copied along, since the recovered model has the same shapes.
    :param overwrite: replace an existing `out`.
    """
    files = {}
    prune_report = Path(source) / REPORT_FILE if source is not None else None
    if prune_report is not None and prune_report.is_file():
        files[REPORT_FILE] = prune_report.read_text()
    files[RECOVER_REPORT_FILE] = json.dumps(report, indent=2)
    return save_model_folder(model, tokenizer, out, files, overwrite)
