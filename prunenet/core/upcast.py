"""Run a half-precision model in float32 without holding a float32 copy of its weights.

Writing the own text of a 7B checkpoint means 60+ sampling steps of the whole model. On a CPU
without native float16 arithmetic (AVX-512 FP16), torch's float16 matrix products are slow, and
a float32 copy (27 GB) does not fit a 24 GB machine. Here every `nn.Linear` keeps its half
weights and, on each call, converts them block by block into one small reused float32 buffer
before multiplying: measured on LLaMA-2-7B MLP shapes (4096 -> 11008), batch 8, one thread,
25 ms idle (41 ms with 256-row blocks on the shared machine, where torch's float16 product took
74 ms; 66-76 ms in other runs). The other parameters (norms, embeddings; a few hundred MB) are
converted to float32 for the duration, so the model computes exactly what a float32 load of the
same checkpoint computes, up to the order of float32 sums.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)
# Output rows converted at a time: 64 x 4096 float32 is 1 MB, a core's L2. Measured on LLaMA-2-7B
# MLP shapes (batch 8, one thread, machine shared): 64 and 32 rows fastest, 256 rows 25% slower.
BLOCK_ROWS = 64


def upcast_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buffer: torch.Tensor
) -> torch.Tensor:
    """`x @ weight.T + bias` in float32, converting `weight` `BLOCK_ROWS` rows at a time.

    :param x: ... x in_features inputs, any float dtype.
    :param weight: out_features x in_features, any float dtype (left as it is).
    :param bias: out_features, or None.
    :param buffer: float32 scratch space of at least BLOCK_ROWS x in_features elements.
    """
    flat = x.reshape(-1, x.shape[-1]).float()
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], BLOCK_ROWS):
        rows = min(BLOCK_ROWS, weight.shape[0] - start)
        block = buffer[: rows * weight.shape[1]].view(rows, weight.shape[1])
        block.copy_(weight[start : start + rows])
        out[:, start : start + rows] = flat @ block.T
    if bias is not None:
        out += bias.float()
    return out.reshape(*x.shape[:-1], weight.shape[0])


@contextlib.contextmanager
def float32_compute(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block `model` computes in float32 while its `nn.Linear` weights stay in their
    half dtype; everything is put back on exit. A float32 model is left untouched.

    :param model: a CPU model whose parameters are float16 or bfloat16 (or float32).
    """
    # Only plain nn.Linear: a subclass may compute something else. A weight tied to another
    # module (embeddings) is converted instead, so that module's outputs are float32 too.
    elsewhere = {
        id(p) for m in model.modules() if type(m) is not nn.Linear for p in m.parameters(False)
    }
    linears = [
        m
        for m in model.modules()
        if type(m) is nn.Linear and m.weight.dtype in HALF_DTYPES and id(m.weight) not in elsewhere
    ]
    in_linears = {id(p) for m in linears for p in m.parameters(recurse=False)}
    others = [p for p in model.parameters() if id(p) not in in_linears and p.dtype in HALF_DTYPES]
    if not linears and not others:
        yield model
        return
    original = [p.data for p in others]
    width = max((m.in_features for m in linears), default=0)
    buffer = torch.empty(BLOCK_ROWS * width, dtype=torch.float32)
    shadowed = [m for m in linears if "forward" in vars(m)]
    if shadowed:
        raise ValueError(
            f"{len(shadowed)} linear layer(s) already carry an instance-level forward (hooks?)"
        )
    try:
        for p in others:
            p.data = p.data.float()
        for m in linears:
            m.forward = _upcast_forward(m, buffer)
        yield model
    finally:
        for m in linears:
            vars(m).pop("forward", None)
        for p, data in zip(others, original, strict=True):
            p.data = data


def _upcast_forward(module: nn.Linear, buffer: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return upcast_linear(x, module.weight, module.bias, buffer)

    return forward
