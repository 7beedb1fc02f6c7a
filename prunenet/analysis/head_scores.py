"""Data-free attention-head scores: how much each head writes into the residual stream.

Removing a head is zeroing its block of output-projection columns (`prunenet.core.heads`), so
the natural importance of a head is the size of what that block adds to the residual stream:
`output_energy_scores` measures it on text the model writes itself (no dataset), as the mean
squared norm of head_output @ W_o[:, head block].T over tokens. `weight_scores` is the
weights-only stand-in for when no forward pass is affordable (streaming): the Frobenius norm of
each head's output-value circuit W_o[:, head] @ W_v[kv(head)], the map a head applies to
whatever it attends to.

A KV group's score is the sum of its query heads' scores: removing the group removes them all.
Both scores work for every supported architecture, including those whose heads cannot be
removed (their layouts are in `prunenet.core.arch.Attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunenet.analysis.selfgen import SelfGenConfig, own_text
from prunenet.core.arch import Adapter, HeadShape, adapter_for, attention_adapter, decoder_layers
from prunenet.core.config_fields import head_shapes
from prunenet.core.surgery import attention_modules, head_weights
from prunenet.errors import PruneNetError

# Self-generated text for head scores: a few sequences are enough for one energy per head.
HEAD_SELFGEN = SelfGenConfig(sequences=8, length=128)


@dataclass
class HeadScores:
    """One layer's head scores (higher = more important).

    :param query: one score per query head.
    :param kv: one score per KV head: the sum of the scores of the query heads that read it.
    """

    query: torch.Tensor
    kv: torch.Tensor


def output_energy_scores(
    model: nn.Module,
    tokens: torch.Tensor | None = None,
    selfgen: SelfGenConfig = HEAD_SELFGEN,
    batch_size: int = 8,
) -> list[HeadScores]:
    """Every layer's head scores from one forward pass over self-generated (or given) tokens.

    A forward pre-hook on each output projection captures its input, the heads' outputs side by
    side; head h's contribution is its block times W_o's block of columns, and its score is the
    mean squared norm of that contribution over all tokens but each sequence's first.

    :param model: a model of a supported architecture.
    :param tokens: batch x length token ids; None to let the model write `selfgen` text itself
        (`prunenet.analysis.selfgen.own_text`, cached on disk).
    :param selfgen: how much text the model writes when `tokens` is None.
    :param batch_size: sequences per forward pass.
    :return: one `HeadScores` per decoder layer.
    """
    if tokens is None:
        tokens = own_text(model, selfgen)
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise PruneNetError(
            f"Head scores need batch x length tokens with length >= 2 (the first token of "
            f"each sequence is left out); got shape {tuple(tokens.shape)}."
        )
    adapter = adapter_for(model.config)
    attention = attention_adapter(model.config)
    shapes = head_shapes(model.config)
    layers = decoder_layers(model)
    energy = [torch.zeros(shape.num_heads, dtype=torch.float64) for shape in shapes]
    counted = [0]

    def hook(module, args, index):
        shape = shapes[index]
        # Leave out the first token of every sequence: SmolLM2's start token (like many
        # models' first position, an attention sink) carries massive activations that would
        # swamp every other token's energy and rank heads by that one position.
        inputs = args[0][:, 1:].detach().float()
        weight = module.weight.detach().float()
        columns = weight if attention.conv1d else weight.T  # (heads * head_dim) x d_model
        size = shape.head_dim
        for head in range(shape.num_heads):
            block = slice(head * size, (head + 1) * size)
            contribution = inputs[..., block] @ columns[block]
            energy[index][head] += contribution.square().sum().double().cpu()

    outputs = [attention_modules(layer, adapter)[1] for layer in layers]
    handles = [
        output.register_forward_pre_hook(
            lambda module, args, index=index: hook(module, args, index)
        )
        for index, output in enumerate(outputs)
    ]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, tokens.shape[0], batch_size):
                batch = tokens[start : start + batch_size].to(device)
                model(batch, use_cache=False)
                counted[0] += batch.shape[0] * (batch.shape[1] - 1)
    finally:
        for handle in handles:
            handle.remove()
    return [
        _with_groups((layer_energy / counted[0]).float(), shape)
        for layer_energy, shape in zip(energy, shapes, strict=True)
    ]


def weight_scores(model: nn.Module) -> list[HeadScores]:
    """Every layer's weights-only head scores (`layer_weight_scores`), no forward pass.

    :param model: a model of a supported architecture.
    """
    adapter = adapter_for(model.config)
    return [
        layer_weight_scores(layer, adapter, shape)
        for layer, shape in zip(decoder_layers(model), head_shapes(model.config), strict=True)
    ]


def layer_weight_scores(layer: nn.Module, adapter: Adapter, shape: HeadShape) -> HeadScores:
    """One layer's weights-only head scores: ||W_o[:, head] @ W_v[kv(head)]||_F per query head.

    The output-value product is what a head adds to the residual stream per unit of attended
    input, so it is zero exactly when the head can write nothing (either factor zero). Computed
    through head_dim x head_dim Gram matrices, never the d_model x d_model product. Works on a
    single layer, so streaming code can score layers as it loads them.

    :param layer: a decoder layer (or a shell with the same module paths).
    :param adapter: its adapter.
    :param shape: the layer's heads.
    """
    weights = head_weights(layer, adapter, shape)
    scores = torch.empty(shape.num_heads)
    for head, output in enumerate(weights.output):
        value = weights.value[head // shape.group_size].float()
        output = output.float()
        # ||O V||_F^2 = trace((O^T O)(V V^T)), both head_dim x head_dim.
        product = (output.T @ output) * (value @ value.T)
        scores[head] = product.sum().clamp_min(0).sqrt()
    return _with_groups(scores, shape)


def _with_groups(query: torch.Tensor, shape: HeadShape) -> HeadScores:
    kv = query.reshape(shape.num_kv_heads, shape.group_size).sum(dim=1)
    return HeadScores(query=query, kv=kv)
