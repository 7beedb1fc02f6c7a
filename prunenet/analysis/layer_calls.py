"""Calling a model's decoder layers one at a time, on hidden states of our choosing.

One forward pass of the dense model records every decoder layer's keyword arguments (masks,
position embeddings; a forward pre-hook per layer, because Gemma 2/3 give layers of different
attention types different ones) and the first layer's input hidden states, without running any
layer. From then on a caller (`prunenet.analysis.sequential`, `.shared`, `.influence`) calls
each layer directly on the hidden states it chooses: one pass per layer, not a full forward per
layer (DESIGN.md, "Findings from December experiments").
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from prunenet.core.arch import decoder_layers
from prunenet.core.surgery import attention_block, ffn_modules
from prunenet.errors import PruneNetError

# Tokens per attention call when a layer runs on a whole text (`attention_in_chunks`): whole
# sequences, 32 of the default 256-token ones.
ATTENTION_ROWS = 8192


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
    try:
        with contextlib.ExitStack() as stack:
            for layer in layers:
                # The layers themselves are not run: only layer 0's input and every layer's
                # other arguments are needed, and neither depends on what earlier layers
                # return. So the capture costs the embedding alone, and works when the layers'
                # weights are not loaded at all (`prunenet.layerwise` keeps them on the meta
                # device until their turn).
                stack.enter_context(replaced_forward(layer, _pass_through))
            # No cache: a cache object in the kwargs would grow with every later layer call.
            model(tokens, use_cache=False)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return first_hidden[0], captured


@contextlib.contextmanager
def replaced_forward(module: nn.Module, forward):
    """`module.forward` is `forward` inside the block; after it, what it was before (an
    instance-level forward, as accelerate's offloading hooks set, is put back).

    :param module: any module.
    :param forward: the callable that replaces its forward.
    """
    own = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


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


class _Stop(Exception):
    """Raised from the FFN output projection's pre-hook once its inputs are recorded."""


def ffn_block(layer: nn.Module, adapter) -> nn.Module | None:
    """The submodule of `layer` that holds every FFN projection (Llama's `mlp`), or None where
    the layer computes its FFN inline (OPT's `fc1`/`fc2` sit on the layer itself).

    :param layer: a decoder layer.
    :param adapter: its `prunenet.core.arch.Adapter`.
    """
    prefixes = {path.rpartition(".")[0] for path in (*adapter.inputs, adapter.output)}
    prefix = prefixes.pop() if len(prefixes) == 1 else ""
    return layer.get_submodule(prefix) if prefix else None


@torch.no_grad()
def ffn_inputs_by_blocks(
    forward, output: nn.Module, hidden: torch.Tensor, block_rows: int
) -> torch.Tensor:
    """The FFN output projection's inputs (rows x d_ff) for every row of `hidden`, computed
    `block_rows` rows at a time: each block stops before the output projection, so its wide
    intermediates (gate, up, their product) exist for one block only, never for all rows.

    The FFN block acts on each row alone, and its output must be the output projection's
    (nothing after it but identities such as eval-mode dropout): the first block is run in full
    and checked, so a block that does more is refused rather than cut wrongly.

    :param forward: the FFN block's own forward (e.g. `type(mlp).forward.__get__(mlp)`).
    :param output: the FFN output projection inside it.
    :param hidden: the block's input, any leading dims.
    :param block_rows: rows per block.
    """
    rows = hidden.reshape(-1, hidden.shape[-1])
    captured: list[torch.Tensor] = []
    stop = [False]

    def grab(module, inputs):
        captured.append(inputs[0].reshape(-1, inputs[0].shape[-1]))
        if stop[0]:
            raise _Stop

    acts = None
    handle = output.register_forward_pre_hook(grab)
    try:
        for start in range(0, rows.shape[0], block_rows):
            block = rows[start : start + block_rows]
            with contextlib.suppress(_Stop):  # every block after the first stops early
                full = forward(block)
            part = captured.pop()
            if start == 0:
                alone = output.forward(part)  # NaN or inf alike: check_finite names those
                if not torch.allclose(full.reshape(alone.shape), alone, 0, 0, equal_nan=True):
                    raise PruneNetError(
                        "This FFN block does more after its output projection than PruneNet "
                        "knows how to cut block by block."
                    )
                acts = part.new_empty(rows.shape[0], part.shape[1])
                stop[0] = True
            acts[start : start + part.shape[0]] = part
    finally:
        handle.remove()
    return acts


@contextlib.contextmanager
def attention_in_chunks(layer: nn.Module, adapter, hidden: torch.Tensor):
    """Inside the block, `layer`'s attention runs on `hidden`'s sequences (sequences x positions
    x width) about `ATTENTION_ROWS` tokens at a time (`by_sequences`); an architecture whose
    adapter has no attention row runs as it is.

    :param layer: a decoder layer.
    :param adapter: its `prunenet.core.arch.Adapter`.
    :param hidden: the hidden states the layer is about to run on.
    """
    attention = attention_block(layer, adapter)
    if attention is None or hidden.dim() != 3:
        yield
        return
    sequences, length = hidden.shape[0], hidden.shape[1]
    chunk = max(1, ATTENTION_ROWS // max(1, length))
    with replaced_forward(attention, by_sequences(attention.forward, sequences, chunk)):
        yield


def by_sequences(forward, sequences: int, chunk: int):
    """`forward` (a per-sequence module's, such as attention's) called `chunk` sequences at a
    time when its input holds `sequences` of them, the outputs written into one tensor each.

    A decoder layer's attention on all 256 x 256 default tokens at once held ~670 MB of
    queries, keys, values and their rotated and attended copies (SmolLM2-135M) on top of the
    hidden states; a chunk of them holds that share. Attention never mixes sequences, so the
    result is the same up to float rounding. Every tensor argument of two or more dims whose
    first dim is `sequences` is sliced with the input (a mask, per-sequence position
    embeddings); the rest (shared embeddings of leading dim 1, positions) pass unchanged.

    :param forward: the module's forward; its first argument (or `hidden_states`) is
        sequences x positions x width, and it returns a tensor or a tuple of tensors and Nones.
    :param sequences: the batch size to chunk (calls with another pass through unchanged).
    :param chunk: sequences per call.
    """

    def part(value, start):
        if isinstance(value, torch.Tensor):
            chunked = value.dim() >= 2 and value.shape[0] == sequences
            return value[start : start + chunk] if chunked else value
        if isinstance(value, (tuple, list)):
            return type(value)(part(item, start) for item in value)
        if isinstance(value, dict):
            return {key: part(item, start) for key, item in value.items()}
        return value

    def call(*args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        whole = not isinstance(hidden, torch.Tensor) or hidden.shape[0] != sequences
        if whole or sequences <= chunk:
            return forward(*args, **kwargs)
        joined = None
        for start in range(0, sequences, chunk):
            output = forward(*part(args, start), **part(kwargs, start))
            joined = _write_chunk(joined, output, start, sequences)
        return joined

    return call


def _write_chunk(joined, output, start: int, sequences: int):
    """`output` of the chunk starting at `start` written into `joined` (allocated from the first
    chunk): tensors along their first dim, tuples item by item, None as None."""
    if output is None:
        return None
    if isinstance(output, torch.Tensor):
        if joined is None:
            joined = output.new_empty(sequences, *output.shape[1:])
        joined[start : start + output.shape[0]] = output
        return joined
    if isinstance(output, tuple):
        joined = joined or (None,) * len(output)
        return tuple(
            _write_chunk(done, item, start, sequences)
            for done, item in zip(joined, output, strict=True)
        )
    raise PruneNetError(
        f"An attention module returned {type(output).__name__}, which PruneNet cannot join "
        "across chunks of sequences."
    )
