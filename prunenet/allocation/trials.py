"""Trial cuts without cutting: a model computing as if FFN rows, heads and layers were gone
(masks and skips through hooks), and the KL of that to the dense model.

`prunenet.allocation.structures` tries one more unit of every structure per greedy step; a
real cut of a copy per trial would copy the model every time, a mask costs one hook per layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from prunenet.analysis.influence import skipping
from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.heads import select_heads
from prunenet.core.surgery import attention_modules, ffn_modules


@contextlib.contextmanager
def masked(model: nn.Module, trial: dict, ffn_scores, head_rank, shapes) -> Iterator[None]:
    """`model` computing as if `trial` were cut: zeroed FFN rows and head outputs, skipped
    layers. Nothing is written to the weights.

    :param model: the dense model.
    :param trial: {"rows": FFN rows removed per layer, "query": query heads removed per KV
        group, "groups": KV groups removed per layer, "dropped": layers skipped}; "rows" and
        "query" are one count for every layer or a list with one count per (dense) layer.
    :param ffn_scores: per layer, FFN row scores (the lowest `rows` are zeroed).
    :param head_rank: per layer, query-head scores (`select_heads` keeps the best).
    :param shapes: per layer, its `HeadShape`.
    """
    adapter = adapter_for(model.config)
    layers = decoder_layers(model)
    handles = []
    with contextlib.ExitStack() as stack:
        for index in trial["dropped"]:
            stack.enter_context(skipping(model, index))
        for index, layer in enumerate(layers):
            if index in trial["dropped"]:
                continue
            rows, query = _per_layer(trial["rows"], index), _per_layer(trial["query"], index)
            if rows:
                scores = ffn_scores[index]
                mask = torch.ones_like(scores)
                mask[torch.argsort(scores, stable=True)[:rows]] = 0
                _, output = ffn_modules(layer, adapter)
                handles.append(output.register_forward_pre_hook(_multiply(mask)))
            if query or trial["groups"]:
                shape = shapes[index]
                keep = select_heads(head_rank[index], shape, shape.num_kv_heads - trial["groups"],
                                    shape.group_size - query)  # fmt: skip
                mask = torch.zeros(shape.num_heads)
                mask[keep.query] = 1
                _, output = attention_modules(layer, adapter)
                handles.append(output.register_forward_pre_hook(
                    _multiply(mask.repeat_interleave(shape.head_dim))))  # fmt: skip
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _per_layer(value, index: int) -> int:
    return value[index] if isinstance(value, (list, tuple)) else value


def _multiply(mask: torch.Tensor):
    def hook(module, inputs):
        return (inputs[0] * mask.to(inputs[0].dtype), *inputs[1:])

    return hook


@torch.no_grad()
def reference_log_probs(model: nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The dense model's next-token log-probabilities, one tensor per sequence.

    :param model: the dense model.
    :param tokens: sequences x length ids.
    """
    return [
        torch.log_softmax(model(row[None], use_cache=False).logits[0].float(), dim=-1)
        for row in tokens
    ]


@torch.no_grad()
def mean_kl(model: nn.Module, tokens: torch.Tensor, reference: list[torch.Tensor]) -> float:
    """Mean KL(dense || model) per token over `tokens` (start token's prediction included).

    :param model: the model as it computes now (e.g. inside `masked`).
    :param tokens: sequences x length ids.
    :param reference: `reference_log_probs` of the dense model on the same tokens.
    """
    total, count = 0.0, 0
    for row, dense in zip(tokens, reference, strict=True):
        log_q = torch.log_softmax(model(row[None], use_cache=False).logits[0].float(), dim=-1)
        total += float((dense.exp() * (dense - log_q)).sum())
        count += row.numel()
    return total / count
