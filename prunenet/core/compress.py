"""Row selection and structured removal: from scores and a ratio to a smaller, saved model.

Ratio r is the fraction of FFN rows removed in a layer (the paper's "compression ratio"); it is
not the fraction of all parameters, so every report carries both.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunenet.core.arch import (
    adapter_for,
    cut_ffn,
    decoder_layers,
    ffn_weights,
    ffn_width,
    set_ffn_widths,
)
from prunenet.errors import PruneNetError
from prunenet.io.saving import atomic_directory

REPORT_FILE = "prunenet_report.json"


@dataclass
class PruneReport:
    """What a pruning run did, with enough context to reproduce it."""

    model_type: str
    num_layers: int
    ffn_width_before: int
    ffn_widths_after: list[int]
    params_before: int
    params_after: int
    target_ratio: float
    seconds: float = 0.0
    scorer: dict = field(default_factory=dict)

    @property
    def ffn_ratio(self) -> float:
        """Fraction of all FFN rows removed (over every layer)."""
        total = self.ffn_width_before * self.num_layers
        return 1.0 - sum(self.ffn_widths_after) / total

    @property
    def params_removed_fraction(self) -> float:
        return 1.0 - self.params_after / self.params_before

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ffn_ratio"] = self.ffn_ratio
        data["params_removed_fraction"] = self.params_removed_fraction
        return data


def validate_ratio(ratio) -> float:
    """A ratio as float in (0, 1), or a clear error."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise PruneNetError(f"Ratio {ratio!r} is not a number; pass a value in (0, 1).") from None
    if not math.isfinite(value) or not 0.0 < value < 1.0:
        raise PruneNetError(
            f"Ratio {ratio!r} is outside (0, 1). It is the fraction of FFN rows removed: "
            "0.3 removes 30% of each FFN's neurons."
        )
    return value


def keep_count(width: int, ratio: float) -> int:
    """Rows kept at `ratio`: round((1 - r) * width), refusing to remove every row."""
    kept = round((1.0 - validate_ratio(ratio)) * width)
    if kept < 1:
        # Suggest 1 - 1/width rounded down: (1 - r) * width = 0.5 would round to 0 (half to
        # even), so the boundary itself is not a safe suggestion.
        largest = math.floor((1.0 - 1.0 / width) * 1e4) / 1e4
        raise PruneNetError(
            f"Ratio {ratio} would remove all {width} FFN rows of a layer; use a smaller ratio "
            f"(at most {largest:.4f} keeps one row)."
        )
    return kept


def select_keep_indices(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """The `kept` highest-scoring rows, in their original order.

    A stable sort breaks ties by row index, so selection never depends on the sort backend.
    """
    order = torch.argsort(scores.detach().float().cpu(), descending=True, stable=True)
    return order[:kept].sort().values


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def estimated_output_bytes(model: nn.Module, ratio: float) -> int:
    """Bytes `save_pretrained` will write for `model` pruned at `ratio` (weights only, approx.).

    The FFN part shrinks by `ratio`; everything else is written as it is. Used to refuse a run
    before scoring when the disk cannot hold its output.
    """
    adapter = adapter_for(model.config)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    ffn = 0
    for layer in decoder_layers(model):
        weights = ffn_weights(layer, adapter)
        ffn += sum(w.numel() * w.element_size() for w in (*weights.inputs, weights.output))
    return int(total - validate_ratio(ratio) * ffn)


def prune_model(
    model: nn.Module,
    layer_scores: list[torch.Tensor],
    ratio: float,
    layer_ratios: list[float] | None = None,
    layer_keep: list[int] | None = None,
) -> PruneReport:
    """Remove the lowest-scoring FFN rows of every layer in place and update the config.

    :param layer_scores: one score vector per decoder layer (higher = keep).
    :param ratio: global fraction of FFN rows to remove (recorded in the report).
    :param layer_ratios: per-layer ratios; defaults to `ratio` in every layer.
    :param layer_keep: exact rows to keep per layer (overrides `layer_ratios`). Pass this for a
        global budget (prunenet.allocation.budget): rounding each layer's ratio can miss the total.
    """
    start = time.perf_counter()
    ratio = validate_ratio(ratio)
    adapter = adapter_for(model.config)
    layers = decoder_layers(model)
    if len(layer_scores) != len(layers):
        raise PruneNetError(
            f"Got {len(layer_scores)} score vectors for a model with {len(layers)} layers."
        )
    layer_ratios = layer_ratios or [ratio] * len(layers)
    width = ffn_width(model.config)
    params_before = count_parameters(model)
    # Check every input before the first cut: a refusal must leave the model untouched.
    for scores in layer_scores:
        if scores.numel() != width:
            raise PruneNetError(f"Score vector has {scores.numel()} entries, FFN width is {width}.")
    if layer_keep is not None:
        widths_after = [_checked_keep(kept, width) for kept in layer_keep]
    else:
        widths_after = [keep_count(width, layer_ratio) for layer_ratio in layer_ratios]
    if len(widths_after) != len(layers):
        raise PruneNetError(f"Got {len(widths_after)} per-layer targets for {len(layers)} layers.")
    for layer, scores, kept in zip(layers, layer_scores, widths_after, strict=True):
        cut_ffn(layer, adapter, select_keep_indices(scores, kept))
    record_ffn_widths(model.config, widths_after)
    return PruneReport(
        model_type=model.config.model_type,
        num_layers=len(layers),
        ffn_width_before=width,
        ffn_widths_after=widths_after,
        params_before=params_before,
        params_after=count_parameters(model),
        target_ratio=ratio,
        seconds=time.perf_counter() - start,
    )


def record_ffn_widths(config, widths: list[int]) -> None:
    """Write the pruned widths into the config so the saved folder rebuilds the same shapes.

    Equal widths reload with plain `from_pretrained`; different widths are written as
    transformers' `per_layer_config` and reload with `prunenet.load_pruned` (arch.set_ffn_widths
    and loading.py say why).
    """
    set_ffn_widths(config, widths)


def _checked_keep(kept, width: int) -> int:
    if isinstance(kept, bool) or int(kept) != kept or not 1 <= kept <= width:
        raise PruneNetError(
            f"Cannot keep {kept!r} rows of an FFN with {width}: keep a whole number in 1..{width}."
        )
    return int(kept)


def save_pruned(
    model: nn.Module, tokenizer, out: str | Path, report: PruneReport, overwrite: bool = False
) -> Path:
    """Save model, tokenizer and report atomically: nothing appears at `out` unless all succeed."""
    out = Path(out).expanduser()
    with atomic_directory(out, overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    return out
