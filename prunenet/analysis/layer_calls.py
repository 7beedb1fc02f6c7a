"""Calling a model's decoder layers one at a time, on hidden states of our choosing.

One forward pass of the dense model records every decoder layer's keyword arguments (masks,
position embeddings; a forward pre-hook per layer, because Gemma 2/3 give layers of different
attention types different ones) and the first layer's input hidden states, without running any
layer. From then on a caller (`prunenet.analysis.sequential`, `.shared`, `.influence`) calls
each layer directly on the hidden states it chooses: one pass per layer, not a full forward per
layer (DESIGN.md, "Findings from December experiments").
"""

from __future__ import annotations

import torch
from torch import nn

from prunenet.core.arch import decoder_layers
from prunenet.core.surgery import ffn_modules


class _Captured(Exception):
    """Raised from the last layer's pre-hook once every layer's inputs are recorded."""


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, tokens: torch.Tensor
) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
    """The first decoder layer's input hidden states and every layer's other arguments.

    :param model: the (dense) model.
    :param tokens: batch x length token ids.
    :return: hidden states (batch x length x d_model) and, per layer, (extra positional
        arguments, keyword arguments) as the model passed them.
    """
    layers = decoder_layers(model)
    captured: list[tuple[tuple, dict] | None] = [None] * len(layers)
    first_hidden: list[torch.Tensor] = []

    def hook(module, args, kwargs, index):
        hidden = args[0] if args else kwargs["hidden_states"]
        if index == 0:
            first_hidden.append(hidden.detach())
        extra = args[1:] if args else ()
        captured[index] = (extra, {k: v for k, v in kwargs.items() if k != "hidden_states"})
        if index == len(layers) - 1:
            # Nothing after the last layer's inputs is needed: stopping here skips its compute
            # and the LM head, whose logits (sequences x length x vocab floats: 6.4 GB for
            # SmolLM2 on 128 x 256 tokens) were most of the run's peak memory.
            raise _Captured

    handles = [
        layer.register_forward_pre_hook(
            lambda module, args, kwargs, index=index: hook(module, args, kwargs, index),
            with_kwargs=True,
        )
        for index, layer in enumerate(layers)
    ]
    # An instance-level forward (accelerate's offloading hooks set one) is put back after.
    own_forwards = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        # The layers themselves are not run: only layer 0's input and every layer's other
        # arguments are needed, and neither depends on what earlier layers return. So the
        # capture costs the embedding alone, and works when the layers' weights are not loaded
        # at all (`prunenet.layerwise` keeps them on the meta device until their turn).
        layer.forward = _pass_through
    try:
        # No cache: a cache object in the kwargs would grow with every later layer call.
        model(tokens, use_cache=False)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
        for layer, forward in zip(layers, own_forwards, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return first_hidden[0], captured


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


@torch.no_grad()
def run_layer(
    layer: nn.Module, hidden: torch.Tensor, arguments: tuple[tuple, dict]
) -> torch.Tensor:
    """One decoder layer applied to `hidden` with the arguments the model gave it."""
    extra, kwargs = arguments
    output = layer(hidden, *extra, **kwargs)
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def ffn_activations(
    layer: nn.Module, adapter, hidden: torch.Tensor, arguments: tuple[tuple, dict]
) -> torch.Tensor:
    """The FFN output projection's inputs (tokens x d_ff, float32) when `layer` runs on `hidden`.

    :param layer: a decoder layer.
    :param adapter: its `prunenet.core.arch.Adapter`.
    :param hidden: the layer's input hidden states.
    :param arguments: the layer's other arguments (`capture_layer_inputs`).
    """
    _, output = ffn_modules(layer, adapter)
    captured: list[torch.Tensor] = []
    handle = output.register_forward_pre_hook(
        lambda module, inputs: captured.append(inputs[0].reshape(-1, inputs[0].shape[-1]))
    )
    try:
        run_layer(layer, hidden, arguments)
    finally:
        handle.remove()
    return captured[0].float()
