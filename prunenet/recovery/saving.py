"""The recovered model's folder: complete or absent, like every PruneNet output."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard
from transformers import PreTrainedModel

from prunenet.io.model_card import CARD_FILE, is_prunenet_card, render_model_card
from prunenet.io.remote_code import MODELING_FILE
from prunenet.io.saving import REPORT_FILE, REQUEST_FILE, save_model_folder

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
        files[CARD_FILE] = recovered_card(Path(source), json.loads(files[REPORT_FILE]), report)
    files[RECOVER_REPORT_FILE] = json.dumps(report, indent=2)
    return save_model_folder(model, tokenizer, out, files, overwrite)


def recovered_card(source: Path, prune_report: dict, report: dict) -> str:
    """The recovered folder's model card: the pruned input's (its base model and license come
    from the input's card when PruneNet wrote it) plus a recovery section.

    :param source: the pruned input folder.
    :param prune_report: its `prunenet_report.json`.
    :param report: the recovery's record.
    """
    data = {}
    if is_prunenet_card(source):  # metadata only: a YAML block, no code
        data = ModelCard.load(source / CARD_FILE).data.to_dict()
    request_file = source / REQUEST_FILE
    record = json.loads(request_file.read_text()) if request_file.is_file() else {}
    return render_model_card(
        prune_report,
        source=str(record.get("model") or source),
        base_model=data.get("base_model"),
        license=data.get("license"),
        command=record.get("command"),
        request=record.get("request"),
        needs_remote_code=(source / MODELING_FILE).is_file(),  # same shapes as the input
        recovery=report,
    )
