"""How much does the model's own output change when one layer's FFN is pruned? (data-free)

The "auto" allocation needs a per-layer damage curve. Its scale is measured end to end, on text
the model generated itself: for each layer, the lowest-scoring rows of that layer alone are
masked at `REFERENCE_RATIO` and the mean KL divergence between the dense model's next-token
distribution and the masked model's is recorded. Local signals alone (a layer's own output
error, its spectrum) miss what matters on SmolLM2: layer 0's FFN is locally ordinary but
removing 30% of it multiplies perplexity by up to ~200. The curve's shape over ratios comes
from the layer's local output error on the same kind of text (cheap at any ratio):
cost_l(r) = KL_l(ref) * err_l(r) / err_l(ref). One forward pass per layer instead of one per
(layer, ratio) made the measurement 4x cheaper at equal perplexity on SmolLM2 (README).

The curves do not depend on the target ratio, so one measurement serves every ratio, and it is
cached on disk with the model's activations.

Given the run's own text (`prunenet prune` passes it), the curves are measured on the part of it
strategies read (`prunenet.allocation.strategy.strategy_tokens`): the KL on its held-out
sequences, which the cut's refit never fits on, and the scores and local errors on the rest. So
one run writes one text. Without it (a library caller with no text), the model writes a small
text of its own (`SENSITIVITY_TEXT`) and the scorer reads its own activations.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunenet.allocation.budget import DEFAULT_MAX_RATIO, CostGrid, allocate_rows
from prunenet.allocation.strategy import split_held_out, strategy_tokens
from prunenet.analysis.selfgen import (
    SelfGenConfig,
    activations_on,
    collect_activations,
    generate_own_text,
)
from prunenet.analysis.spectral import function_error, output_energy
from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.compress import select_keep_indices
from prunenet.core.config_fields import ffn_widths
from prunenet.core.ratios import keep_count, rows_for_ratio
from prunenet.core.surgery import ffn_modules, ffn_weights
from prunenet.errors import PruneNetError
from prunenet.io.cache import CacheEntryError, Info, Tensors, memoize, stored_tensor

SENSITIVITY_RATIOS = tuple(round(0.05 * k, 2) for k in range(1, 13))  # 0.05 .. 0.6
SENSITIVITY_TEXT = SelfGenConfig(sequences=4, length=96)
# Ratio-aware scorers (a policy) rank rows for this ratio when the curves are measured, so one
# measurement serves every target ratio.
REFERENCE_RATIO = 0.3
ALLOCATIONS = ("uniform", "auto")


class RowScorer(Protocol):
    """What the auto allocation needs of a scorer (`prunenet.scoring.base.Scorer` has it):
    declared here so that allocation depends on no scorer package (the scorers sit above it)."""

    weights_only: bool

    def describe(self) -> dict: ...

    def score_model(self, model: nn.Module, ratio: float | None = None) -> list[torch.Tensor]: ...

    def score_activations(
        self, ffn, activations, layer_index: int, num_layers: int, ratio: float | None = None
    ) -> torch.Tensor: ...


def auto_allocation(
    model: nn.Module,
    scorer: RowScorer,
    ratio: float,
    max_layer_ratio: float = DEFAULT_MAX_RATIO,
    tokens: torch.Tensor | None = None,
) -> list[int]:
    """Rows to remove per layer for a global `ratio`: least total self-generated KL damage.

    Exactly `round(ratio * all FFN rows)` rows go, at most `max_layer_ratio` of any layer.

    :param model: the dense model.
    :param scorer: ranks each layer's rows (the curves measure the rows it would remove).
    :param ratio: the share of all FFN rows to remove.
    :param max_layer_ratio: the most any one layer loses.
    :param tokens: the run's own text (`prunenet.analysis.sequential.analysis_text`); None:
        the model writes `SENSITIVITY_TEXT` for this alone.
    """
    if max_layer_ratio > SENSITIVITY_RATIOS[-1]:
        raise PruneNetError(
            f"--max-layer-ratio {max_layer_ratio} exceeds the largest measured layer ratio "
            f"{SENSITIVITY_RATIOS[-1]}; use at most {SENSITIVITY_RATIOS[-1]}."
        )
    widths = ffn_widths(model.config)
    if tokens is None:
        text = asdict(SENSITIVITY_TEXT)

        def measure() -> list[CostGrid]:
            return layer_sensitivity(model, scorer.score_model(model, ratio=REFERENCE_RATIO))
    else:
        tokens = tokens.cpu()
        digest = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
        text = {"run_text": digest, "shape": list(tokens.shape)}

        def measure() -> list[CostGrid]:
            return run_text_sensitivity(model, scorer, tokens)

    curves = memoize(
        "sensitivity",
        model,
        {"scorer": scorer.describe(), "ratios": SENSITIVITY_RATIOS, "text": text},
        measure,
        encode=_encode_curves,
        decode=lambda tensors, info: _decode_curves(tensors, info, len(widths)),
    )
    return allocate_rows(curves, widths, rows_for_ratio(widths, ratio), max_ratio=max_layer_ratio)


def run_text_sensitivity(
    model: nn.Module, scorer: RowScorer, tokens: torch.Tensor, progress: bool = True
) -> list[CostGrid]:
    """`layer_sensitivity` on the run's own text: the part strategies read, its held-out
    sequences for the KL, the rest for the activations the scorer and the local errors read.

    :param model: the dense model.
    :param scorer: ranks each layer's rows at `REFERENCE_RATIO` (an activation scorer on these
        activations; a weights-only scorer on the weights).
    :param tokens: the run's own text.
    :param progress: show a progress bar.
    """
    fit, kl_tokens = split_held_out(strategy_tokens(tokens))
    device = next(model.parameters()).device
    stats = activations_on(model, fit.to(device), SelfGenConfig().kept_tokens, seed=0)
    if scorer.weights_only:
        scores = scorer.score_model(model, ratio=REFERENCE_RATIO)
    else:
        adapter, layers = adapter_for(model.config), decoder_layers(model)
        scores = [
            scorer.score_activations(ffn_weights(layer, adapter), stats[index], index,
                                     len(layers), REFERENCE_RATIO)
            for index, layer in enumerate(layers)
        ]  # fmt: skip
    return layer_sensitivity(model, scores, progress=progress, tokens=kl_tokens.to(device),
                             activations=stats)  # fmt: skip


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    layer_scores: Sequence[torch.Tensor],
    ratios: Sequence[float] = SENSITIVITY_RATIOS,
    text: SelfGenConfig = SENSITIVITY_TEXT,
    progress: bool = True,
    tokens: torch.Tensor | None = None,
    activations: Sequence | None = None,
) -> list[CostGrid]:
    """One damage curve per layer: KL(dense || layer-pruned at REFERENCE_RATIO), shaped over
    `ratios` by the layer's local output error.

    :param layer_scores: the scores that will choose the rows (so the curve measures the
        damage of the pruning that will actually happen).
    :param ratios: grid of per-layer ratios; the allocator interpolates between them and
        never removes more than the last one.
    :param text: how much self-generated text the KL is measured on, when `tokens` is None.
    :param tokens: the text to measure the KL on (None: the model writes `text`).
    :param activations: each layer's activation statistics for the local errors (None: the
        model's own, `collect_activations`).
    """
    tokens = generate_own_text(model, text) if tokens is None else tokens
    dense = F.log_softmax(model(tokens).logits.float(), dim=-1)
    activations = collect_activations(model) if activations is None else activations
    adapter = adapter_for(model.config)
    layers = decoder_layers(model)
    curves = []
    for layer, scores, acts in tqdm(
        list(zip(layers, layer_scores, activations, strict=True)),
        desc="layer sensitivity",
        unit="layer",
        disable=not progress,
        leave=False,
    ):
        kl = _masked_kl(model, layer, adapter, tokens, dense, _keep_mask(scores, REFERENCE_RATIO))
        output = ffn_weights(layer, adapter).output.float().cpu()
        energy = output_energy(acts.sample, output)

        def local_error(ratio: float, scores=scores, acts=acts, output=output, energy=energy):
            keep = select_keep_indices(scores, keep_count(scores.numel(), ratio))
            return function_error(acts.sample, output, keep, energy)

        reference_error = max(local_error(REFERENCE_RATIO), 1e-12)
        costs = tuple(kl * local_error(r) / reference_error for r in ratios)
        curves.append(CostGrid(tuple(ratios), costs))
    return curves


def _masked_kl(model, layer, adapter, tokens, dense, mask) -> float:
    """Mean KL(dense || model with `layer`'s FFN rows outside `mask` zeroed) per token."""
    _, output = ffn_modules(layer, adapter)
    mask = mask.to(dense.device)
    handle = output.register_forward_pre_hook(
        lambda module, inputs: (inputs[0] * mask.to(inputs[0].dtype), *inputs[1:])
    )
    try:
        pruned = F.log_softmax(model(tokens).logits.float(), dim=-1)
    finally:
        handle.remove()
    return float((dense.exp() * (dense - pruned)).sum(-1).mean().clamp_min(0))


def _keep_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    mask = torch.zeros(scores.numel())
    mask[select_keep_indices(scores, keep_count(scores.numel(), ratio))] = 1.0
    return mask


def _encode_curves(curves: Sequence[CostGrid]) -> tuple[Tensors, Info]:
    """The costs as one float64 `layers x ratios` tensor (exact for Python floats), the ratios
    (shared by every layer's curve) in JSON."""
    costs = torch.tensor([[float(c) for c in curve.costs] for curve in curves], dtype=torch.float64)
    return {"costs": costs}, {"ratios": [float(r) for r in curves[0].ratios]}


def _decode_curves(tensors: Tensors, info: Info, layer_count: int) -> list[CostGrid]:
    """Stored curves, if measured at `SENSITIVITY_RATIOS` for `layer_count` layers with finite
    costs; else `CacheEntryError`."""
    ratios = info.get("ratios")
    if ratios != list(SENSITIVITY_RATIOS):
        raise CacheEntryError(f"curves measured at ratios {ratios}, expected {SENSITIVITY_RATIOS}")
    costs = stored_tensor(tensors, "costs", torch.float64, (layer_count, len(ratios)))
    return [CostGrid(tuple(ratios), tuple(row)) for row in costs.tolist()]
