"""How much does the model's own output change when one layer's FFN is pruned? (data-free)

The "auto" allocation needs a per-layer damage curve. We measure it end to end, on text the
model generated itself: for each layer and each ratio of a small grid, the lowest-scoring rows
of that layer alone are masked and the mean KL divergence between the dense model's next-token
distribution and the masked model's is recorded. Local signals (a layer's own output error,
its spectrum) miss what matters on SmolLM2: layer 0's FFN is locally ordinary but removing 30%
of it multiplies perplexity by up to ~200.

All grid ratios of a layer run in one batched forward pass (the mask differs per batch row),
so the cost is one forward per layer. The curves do not depend on the target ratio, so one
measurement serves every ratio (and is cached on disk with the model's activations).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunenet.allocation import DEFAULT_MAX_RATIO, CostGrid, allocate_rows, rows_for_ratio
from prunenet.arch import adapter_for, decoder_layers, ffn_modules, ffn_widths
from prunenet.cache import memoize
from prunenet.compress import keep_count, select_keep_indices
from prunenet.errors import PruneNetError
from prunenet.scorers import Scorer
from prunenet.selfgen import SelfGenConfig, generate_own_text

SENSITIVITY_RATIOS = (0.15, 0.3, 0.45, 0.6)
SENSITIVITY_TEXT = SelfGenConfig(sequences=2, length=96)
# Ratio-aware scorers (a policy) rank rows for this ratio when the curves are measured, so one
# measurement serves every target ratio.
REFERENCE_RATIO = 0.3
ALLOCATIONS = ("auto", "uniform")


def auto_allocation(
    model: nn.Module, scorer: Scorer, ratio: float, max_layer_ratio: float = DEFAULT_MAX_RATIO
) -> list[int]:
    """Rows to remove per layer for a global `ratio`: least total self-generated KL damage.

    Exactly `round(ratio * all FFN rows)` rows go, at most `max_layer_ratio` of any layer.
    """
    if max_layer_ratio > SENSITIVITY_RATIOS[-1]:
        raise PruneNetError(
            f"--max-layer-ratio {max_layer_ratio} exceeds the largest measured layer ratio "
            f"{SENSITIVITY_RATIOS[-1]}; use at most {SENSITIVITY_RATIOS[-1]}."
        )
    widths = ffn_widths(model.config)
    curves = memoize(
        "sensitivity",
        model,
        {
            "scorer": scorer.describe(),
            "ratios": SENSITIVITY_RATIOS,
            "text": asdict(SENSITIVITY_TEXT),
        },
        lambda: layer_sensitivity(model, scorer.score_model(model, ratio=REFERENCE_RATIO)),
    )
    return allocate_rows(curves, widths, rows_for_ratio(widths, ratio), max_ratio=max_layer_ratio)


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    layer_scores: Sequence[torch.Tensor],
    ratios: Sequence[float] = SENSITIVITY_RATIOS,
    text: SelfGenConfig = SENSITIVITY_TEXT,
    progress: bool = True,
) -> list[CostGrid]:
    """One damage curve per layer: mean KL(dense || layer-pruned) at each of `ratios`.

    :param layer_scores: the scores that will choose the rows (so the curve measures the
        damage of the pruning that will actually happen).
    :param ratios: grid of per-layer ratios; the allocator interpolates between them and
        never removes more than the last one.
    :param text: how much self-generated text to measure on.
    """
    tokens = generate_own_text(model, text)
    dense = F.log_softmax(model(tokens).logits.float(), dim=-1)
    batch = tokens.repeat(len(ratios), 1)
    reference = dense.repeat(len(ratios), 1, 1)
    adapter = adapter_for(model.config)
    curves = []
    layers = decoder_layers(model)
    for layer, scores in tqdm(
        list(zip(layers, layer_scores, strict=True)),
        desc="layer sensitivity",
        unit="layer",
        disable=not progress,
        leave=False,
    ):
        masks = torch.stack([_keep_mask(scores, ratio) for ratio in ratios])
        masks = masks.repeat_interleave(tokens.shape[0], dim=0)[:, None, :].to(dense.device)
        _, output = ffn_modules(layer, adapter)
        handle = output.register_forward_pre_hook(
            lambda module, inputs, masks=masks: (inputs[0] * masks.to(inputs[0].dtype), *inputs[1:])
        )
        try:
            pruned = F.log_softmax(model(batch).logits.float(), dim=-1)
        finally:
            handle.remove()
        kl = (reference.exp() * (reference - pruned)).sum(-1).mean(-1)
        per_ratio = kl.view(len(ratios), tokens.shape[0]).mean(dim=1)
        curves.append(CostGrid(tuple(ratios), tuple(per_ratio.clamp_min(0).tolist())))
    return curves


def _keep_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    mask = torch.zeros(scores.numel())
    mask[select_keep_indices(scores, keep_count(scores.numel(), ratio))] = 1.0
    return mask
