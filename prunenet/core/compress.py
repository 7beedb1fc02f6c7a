"""Row selection and structured removal: from scores and a ratio to a smaller, saved model.

Ratio r is the fraction of FFN rows removed in a layer (the paper's "compression ratio"); it is
not the fraction of all parameters, so every report carries both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.config_fields import ffn_width, set_ffn_widths
from prunenet.core.ratios import validate_ratio
from prunenet.core.surgery import cut_ffn, ffn_weights
from prunenet.errors import PruneNetError


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
    # Heads and layers removed beside FFN rows (`prunenet.allocation.structures`), if any.
    structures: dict = field(default_factory=dict)
    # Wall seconds per stage of the run (`prunenet.stages.StageTimes.to_dict`), if timed.
    stages: dict = field(default_factory=dict)

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


# cut(layer index, layer, its scores or None, rows to keep) -> the kept row indices.
LayerCut = Callable[[int, nn.Module, "torch.Tensor | None", int], torch.Tensor]


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
    layer_scores: list[torch.Tensor] | None,
    layer_keep: list[int],
    *,
    target_ratio: float | None = None,
    cut: LayerCut | None = None,
) -> PruneReport:
    """Keep the `layer_keep[i]` highest-scoring FFN rows of layer i, in place; update the config.

    How much to keep is said one way only, in whole rows per layer: `prunenet.core.ratios.
    uniform_keep` for the same ratio everywhere, `prunenet.allocation` for a global budget
    (rounding per-layer ratios could miss the total).

    :param model: a model of a supported architecture (`prunenet.core.arch`).
    :param layer_scores: one score vector per decoder layer (higher = keep); None when `cut`
        scores each layer itself as it reaches it (sequential analysis).
    :param layer_keep: rows to keep per layer, each in 1..width.
    :param target_ratio: the ratio the caller asked for, recorded in the report; defaults to the
        fraction of all FFN rows actually removed.
    :param cut: `cut(index, layer, scores, kept)` removes all but `kept` rows of one layer and
        returns the indices it kept; called for the layers in order. The default keeps the
        top-scoring rows with `surgery.cut_ffn`. `prunenet.analysis.sequential.SequentialCut`
        replaces it to score each layer on the already-cut model and to refit it.
    """
    start = time.perf_counter()
    adapter = adapter_for(model.config)
    layers = decoder_layers(model)
    width = ffn_width(model.config)
    params_before = count_parameters(model)
    # Check every input before the first cut: a refusal must leave the model untouched.
    if layer_scores is None:
        if cut is None:
            raise PruneNetError("No scores given and no cut that scores layers itself.")
        layer_scores = [None] * len(layers)
    if len(layer_scores) != len(layers):
        raise PruneNetError(
            f"Got {len(layer_scores)} score vectors for a model with {len(layers)} layers."
        )
    for scores in layer_scores:
        if scores is not None and scores.numel() != width:
            raise PruneNetError(f"Score vector has {scores.numel()} entries, FFN width is {width}.")
    widths_after = [_checked_keep(kept, width) for kept in layer_keep]
    if len(widths_after) != len(layers):
        raise PruneNetError(f"Got {len(widths_after)} per-layer targets for {len(layers)} layers.")
    for index, (layer, scores, kept) in enumerate(
        zip(layers, layer_scores, widths_after, strict=True)
    ):
        if cut is None:
            cut_ffn(layer, adapter, select_keep_indices(scores, kept))
        else:
            cut(index, layer, scores, kept)
    record_ffn_widths(model.config, widths_after)
    achieved = 1.0 - sum(widths_after) / (width * len(layers))
    return PruneReport(
        model_type=model.config.model_type,
        num_layers=len(layers),
        ffn_width_before=width,
        ffn_widths_after=widths_after,
        params_before=params_before,
        params_after=count_parameters(model),
        target_ratio=achieved if target_ratio is None else validate_ratio(target_ratio),
        seconds=time.perf_counter() - start,
    )


def record_ffn_widths(config, widths: list[int]) -> None:
    """Write the pruned widths into the config so the saved folder rebuilds the same shapes.

    Equal widths reload with plain `from_pretrained`; different widths are written as
    transformers' `per_layer_config` and reload with `prunenet.load_pruned`
    (`config_fields.set_ffn_widths` and loading.py say why).
    """
    set_ffn_widths(config, widths)


def _checked_keep(kept, width: int) -> int:
    if isinstance(kept, bool) or int(kept) != kept or not 1 <= kept <= width:
        raise PruneNetError(
            f"Cannot keep {kept!r} rows of an FFN with {width}: keep a whole number in 1..{width}."
        )
    return int(kept)
