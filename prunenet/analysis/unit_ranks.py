"""Ranks of the units the structure greedy removes: FFN rows and query heads, one pass each.

Both read the model's own text; the greedy (`prunenet.allocation.structures`) and the strategy
environment (`prunenet.allocation.strategy`) take rows and heads in this order.
"""

from __future__ import annotations

import torch
from torch import nn

from prunenet.analysis.head_scores import output_energy_scores
from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.surgery import ffn_modules, ffn_weights


@torch.no_grad()
def ffn_activation_scores(model: nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """rms(activation) x output column norm per FFN row (the `selfgen` heuristic), one pass.

    :param model: the dense model.
    :param tokens: its own text (sequences x length ids); the start token is left out.
    """
    adapter = adapter_for(model.config)
    layers = decoder_layers(model)
    energy = [None] * len(layers)
    handles = []
    for index, layer in enumerate(layers):
        _, output = ffn_modules(layer, adapter)

        def hook(module, inputs, index=index):
            acts = inputs[0].reshape(-1, inputs[0].shape[-1])[1:].float()  # the start token
            energy[index] = acts.pow(2).mean(dim=0)

        handles.append(output.register_forward_pre_hook(hook))
    try:
        model(tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [
        energy[i].sqrt() * ffn_weights(layer, adapter).output.float().norm(dim=0)
        for i, layer in enumerate(layers)
    ]


def head_ranks(model: nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, query-head scores (output energy through the output projection).

    :param model: the dense model.
    :param tokens: its own text (sequences x length ids).
    """
    return [scores.query for scores in output_energy_scores(model, tokens)]
