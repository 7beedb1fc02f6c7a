"""Data-free scores for whole decoder layers, on text the model writes itself.

Which layers can go (`prunenet.core.depth.drop_layers`) is judged on the model's own samples
(`prunenet.analysis.selfgen.own_text`), never a dataset:

- `block_influence`: ShortGPT's Block Influence, 1 - the mean cosine similarity between a
  layer's input and output hidden states. A layer that barely turns the residual stream scores
  near 0 and is the first to drop. One pass per layer (`analysis.sequential`), no full forwards.
- `skip_kl`: KL(dense || dense with layer i skipped) on the next-token distributions, one full
  forward per layer and batch: slower, but it measures what skipping a layer does to the output.

Both return one score per layer, higher = more important (keep); drop the lowest.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunenet.analysis.layer_calls import capture_layer_inputs, run_layer
from prunenet.analysis.selfgen import SelfGenConfig, own_text
from prunenet.core.arch import decoder_layers
from prunenet.errors import PruneNetError

# Self-generated text for layer scores when the caller gives none: ShortGPT reports stable
# layer rankings from a few thousand tokens; 8 x 128 is the selfgen default (cached on disk).
INFLUENCE_SELFGEN = SelfGenConfig(sequences=8, length=128, seed=0)


@torch.no_grad()
def block_influence(
    model: nn.Module, tokens: torch.Tensor | None = None, selfgen: SelfGenConfig = INFLUENCE_SELFGEN
) -> torch.Tensor:
    """ShortGPT's Block Influence of every decoder layer: 1 - mean cos(layer input, output).

    The layers run in turn on the hidden states the previous layer produced (the dense model's
    own, layer by layer), so the scores are those of the full forward pass.

    :param model: the (dense) model.
    :param tokens: sequences x length token ids (length >= 2); None lets the model write
        `selfgen` text itself (`own_text`, cached).
    :param selfgen: how much text to write when `tokens` is None.
    :return: float32 tensor with one score per layer, in [0, 2]; ~0 means the layer leaves the
        residual stream's direction unchanged.
    """
    tokens = _analysis_tokens(model, tokens, selfgen)
    layers = decoder_layers(model)
    hidden, arguments = capture_layer_inputs(model, tokens)
    scores = torch.empty(len(layers), dtype=torch.float32)
    for index, layer in enumerate(tqdm(layers, desc="block influence", unit="layer", leave=False)):
        output = run_layer(layer, hidden, arguments[index])
        # Each sequence's first token is left out. Every self-generated sequence starts with the
        # same start token at the same position, and in SmolLM2 that position carries "massive
        # activations" (a hidden state orders of magnitude larger than the others). Its cosine
        # says how a layer treats that one outlier state, not how it treats text, yet it would
        # count once per sequence: on SmolLM2-135M it moved layer 11's score from 0.041 to 0.069
        # and reordered the middle layers (measured on two short prompts).
        similarity = F.cosine_similarity(hidden[:, 1:].float(), output[:, 1:].float(), dim=-1)
        scores[index] = 1.0 - similarity.mean().cpu()
        hidden = output
    return scores.clamp(0.0, 2.0)  # rounding can step a hair past the bounds


@torch.no_grad()
def skip_kl(
    model: nn.Module,
    tokens: torch.Tensor | None = None,
    selfgen: SelfGenConfig = INFLUENCE_SELFGEN,
    batch_size: int = 8,
) -> torch.Tensor:
    """KL(dense || model with layer i skipped) per layer, averaged over every predicted token.

    Unlike `block_influence`, every position counts, the first included: the KL compares
    next-token distributions, which the start token's large hidden state does not dominate.

    :param model: the (dense) model.
    :param tokens: sequences x length token ids; None lets the model write `selfgen` text.
    :param selfgen: how much text to write when `tokens` is None.
    :param batch_size: sequences per forward pass; the dense log-probabilities of one batch
        are held (batch x length x vocab floats) while every layer is skipped in turn.
    :return: float32 tensor with one score per layer, >= 0; higher = skipping it hurts more.
    """
    if batch_size < 1:
        raise PruneNetError(f"batch_size must be at least 1, got {batch_size}.")
    tokens = _analysis_tokens(model, tokens, selfgen)
    layers = decoder_layers(model)
    totals = torch.zeros(len(layers), dtype=torch.float64)
    batches = tokens.split(batch_size)
    bar = tqdm(total=len(batches) * len(layers), desc="skip KL", unit="layer", leave=False)
    for batch in batches:
        # Batches outside, layers inside: the dense pass runs once per batch and only one
        # batch's full-vocabulary log-probabilities are ever held.
        dense = _log_probs(model, batch)
        for index in range(len(layers)):
            with skipping(model, index):
                skipped = _log_probs(model, batch)
            kl = (dense.exp() * (dense - skipped)).sum(-1)  # per token
            totals[index] += kl.double().sum().cpu()
            bar.update(1)
    bar.close()
    return (totals / tokens.numel()).clamp(min=0.0).float()


@contextmanager
def skipping(model: nn.Module, index: int) -> Iterator[None]:
    """Within the block, decoder layer `index` passes its input hidden states on unchanged.

    :param model: a model of a supported architecture.
    :param index: the layer to skip.
    """
    layer = decoder_layers(model)[index]

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        # Falcon's layers return (hidden states, attention weights); the others a tensor.
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = layer.register_forward_hook(identity, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _analysis_tokens(
    model: nn.Module, tokens: torch.Tensor | None, selfgen: SelfGenConfig
) -> torch.Tensor:
    if tokens is None:
        tokens = own_text(model, selfgen)
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise PruneNetError(
            f"Layer scores need sequences x length token ids with length >= 2 (the first token "
            f"of each sequence is not scored); got shape {tuple(tokens.shape)}."
        )
    return tokens.to(next(model.parameters()).device)


def _log_probs(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    # No cache: skipping is per forward, and a cache would only cost memory here.
    return F.log_softmax(model(tokens, use_cache=False).logits.float(), dim=-1)
