"""What a policy checkpoint may declare, checked before any network is built from it.

A checkpoint's JSON says how large its network is and its safetensors member holds the tensors;
both come from whoever made the file. The loaders (`rl.ppo.checkpoint`, `rl.reinforce.checkpoint`,
`rl.strategy`) check every size against a sane bound and every tensor's name, shape, dtype and
values against the network those sizes describe, and only then allocate it; each check answers
with why the input cannot be used, and the loader adds what to do.
"""

from __future__ import annotations

import torch

from prunenet.errors import clip

# The widest hidden layer a checkpoint may declare. Trained policies use 8-64; 4096 already means
# a network of about 70 M parameters. A larger number is a damaged or hostile file, refused
# before the network is built (`hidden: 30000` would allocate tens of GB).
MAX_HIDDEN = 4096


def count_problem(name: str, value: object, upper: int) -> str | None:
    """Why `value` cannot be the size `name` of a network (None when it can): it must be a JSON
    integer (not `true`, which Python counts as 1) from 1 to `upper`.

    :param name: the metadata key, named in the answer.
    :param value: what the checkpoint says (None: missing or null).
    :param upper: the largest size accepted (a sane bound, so nothing huge is allocated).
    """
    if value is None:
        return f"no {name} (missing or null; a whole number from 1 to {upper:,} is needed)"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        return f"{name}={clip(repr(value))}, which is not a whole number from 1 to {upper:,}"
    return None


def tensor_problem(
    state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], network: str
) -> str | None:
    """Why `state` cannot be loaded into the network whose tensors are `expected` (None when it
    can): names and shapes must match exactly, values be finite floating-point numbers. Checked
    before the network is built, so a file's claims never decide what is allocated.

    :param state: the tensors read from the checkpoint.
    :param expected: name -> shape of every tensor the declared network has.
    :param network: the declared network in words, for the answer.
    """
    missing = [name for name in expected if name not in state]
    unexpected = [clip(name) for name in state if name not in expected]
    if missing or unexpected:
        found = [f"missing {listed(missing)}"] if missing else []
        found += [f"unexpected {listed(unexpected)}"] if unexpected else []
        return f"its weights are not those of {network} ({'; '.join(found)})"
    wrong = [
        f"{name} is {tuple(state[name].shape)}, expected {shape}"
        for name, shape in expected.items()
        if tuple(state[name].shape) != shape
    ]
    if wrong:
        return f"its weights do not match {network}: {listed(wrong)}"
    not_float = [name for name, tensor in state.items() if not tensor.is_floating_point()]
    if not_float:
        return f"its weights {listed(not_float)} are not floating-point numbers"
    broken = [name for name, tensor in state.items() if not bool(torch.isfinite(tensor).all())]
    if broken:
        return f"its weights {listed(broken)} hold NaN or infinite values"
    return None


def listed(items: list, limit: int = 3) -> str:
    """`items` for a message: at most `limit` of them, then how many more (a file with
    thousands of bad tensors must not make a message of thousands of names).

    :param items: what to name (each shown with `str`).
    :param limit: how many are named.
    """
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f" ... ({len(items) - limit} more)" if len(items) > limit else "")
