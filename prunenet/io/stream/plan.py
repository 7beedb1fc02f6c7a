"""Planning a streamed prune: which checkpoint tensors are FFN weights, and their shapes after.

The adapter row (`prunenet.core.arch`) gives the module paths; the only fact learned from the
files is the prefix in front of the layers path. Output shapes come from running the real cut
on a meta-device layer shell, so they match in-memory pruning for every layout by construction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from prunenet.core.arch import Adapter
from prunenet.core.config_fields import ffn_width
from prunenet.core.ratios import keep_count
from prunenet.core.surgery import cut_ffn, ffn_weights, layer_shell, shell_tensors
from prunenet.errors import PruneNetError
from prunenet.io.stream.checkpoint import DTYPE_BYTES, Checkpoint, TensorEntry


@dataclass
class PruningPlan:
    """Everything decided before any data is read.

    :param prefix: the checkpoint's name for the adapter's layers path (e.g. `model.layers`).
    :param roles: FFN tensor name -> (layer index, module path, parameter name).
    :param layer_tensors: per layer, the names of its FFN tensors (weights and input biases).
    :param out_shapes: FFN tensor name -> shape after pruning; other tensors keep theirs.
    """

    prefix: str
    num_layers: int
    width: int
    ratios: list[float]
    kept: list[int]
    roles: dict[str, tuple[int, str, str]]
    layer_tensors: list[list[str]]
    out_shapes: dict[str, tuple[int, ...]]
    params_before: int = 0
    params_after: int = 0
    output_bytes: int = 0

    @property
    def widths_after(self) -> list[int]:
        return list(self.kept)

    def output_entries(self, checkpoint: Checkpoint, shard: str) -> list[TensorEntry]:
        """A shard's tensors as they will be written, widest dtype first (keeps alignment),
        then by name (which groups each layer's tensors)."""
        entries = [
            TensorEntry(e.name, e.shard, e.dtype, self.out_shapes.get(e.name, e.shape))
            for e in checkpoint.tensors.values()
            if e.shard == shard
        ]
        return sorted(entries, key=lambda e: (-DTYPE_BYTES[e.dtype], e.name))


def plan_pruning(
    adapter: Adapter,
    config,
    checkpoint: Checkpoint,
    ratio: float,
    layer_ratios: list[float] | None = None,
) -> PruningPlan:
    """Map the adapter's module paths to checkpoint names and work out every output shape."""
    names = checkpoint.tensors
    prefix = resolve_layers_prefix(adapter, names)
    num_layers = _count_layers(config, prefix, names)
    layer_ratios = layer_ratios or [ratio] * num_layers
    if len(layer_ratios) != num_layers:
        raise PruneNetError(f"Got {len(layer_ratios)} layer ratios for {num_layers} layers.")
    width = ffn_width(config)
    kept = [keep_count(width, r) for r in layer_ratios]
    plan = PruningPlan(prefix, num_layers, width, list(layer_ratios), kept, {}, [], {})
    for layer in range(num_layers):
        roles = ffn_tensor_names(adapter, prefix, layer, names)
        plan.roles.update(roles)
        plan.layer_tensors.append(list(roles))
        shell = layer_shell(
            {name: torch.empty(names[name].shape, device="meta") for name in roles}, roles
        )
        neuron_first = ffn_weights(shell, adapter)
        widths = {w.shape[0] for w in neuron_first.inputs} | {neuron_first.width}
        if widths != {width}:
            raise PruneNetError(
                f"Layer {layer}'s FFN tensors have {sorted(widths)} neurons, but config.json "
                f"says the FFN width is {width}; the checkpoint does not match its config."
            )
        # Cutting the meta shell runs the real cut code on shapes only: the output shapes are
        # whatever `cut_ffn` produces, for every layout, without duplicating its rules.
        cut_ffn(shell, adapter, torch.arange(kept[layer]))
        for name, cut in shell_tensors(shell, roles).items():
            plan.out_shapes[name] = tuple(cut.shape)
    for entry in names.values():
        shape = plan.out_shapes.get(entry.name, entry.shape)
        out = TensorEntry(entry.name, entry.shard, entry.dtype, shape)
        plan.params_before += entry.numel
        plan.params_after += out.numel
        plan.output_bytes += out.nbytes
    return plan


def resolve_layers_prefix(adapter: Adapter, names: Iterable[str]) -> str:
    """The checkpoint's spelling of the adapter's layers path.

    Looks for layer 0's first FFN input weight under the full layers path, then under ever
    shorter tails of it ("model.decoder.layers", "decoder.layers", "layers"), allowing any
    leading prefix; so checkpoints saved from the base model (no "model.") or inside a wrapper
    (an extra prefix) resolve without per-architecture rules.
    """
    probe = f"0.{adapter.inputs[0]}.weight"
    parts = adapter.layers.split(".")
    names = list(names)
    for start in range(len(parts)):
        tail = ".".join([*parts[start:], probe])
        found = {n[: -len(probe) - 1] for n in names if n == tail or n.endswith("." + tail)}
        if len(found) == 1:
            return found.pop()
        if adapter.layers in found:
            return adapter.layers
        if found:
            raise PruneNetError(
                f"Several tensor groups look like the decoder layers: {sorted(found)}; cannot "
                f"tell which one is {adapter.layers!r}."
            )
    raise PruneNetError(
        f"Missing FFN tensor: no tensor named like '{adapter.layers}.{probe}' (with any prefix) "
        "in the checkpoint. Is it truncated, or saved for a different architecture than its "
        "config.json says?"
    )


def ffn_tensor_names(
    adapter: Adapter, prefix: str, layer: int, names: Iterable[str]
) -> dict[str, tuple[int, str, str]]:
    """One layer's FFN tensors that pruning cuts: tensor name -> (layer, module path, param).

    Input projections lose rows in their weight and bias; the output projection loses columns
    of its weight only (its bias has d_model entries), so its bias is copied unchanged.
    """
    names = names if isinstance(names, dict | set) else set(names)
    roles = {}
    for path, params in [*((p, ("weight", "bias")) for p in adapter.inputs),
                         (adapter.output, ("weight",))]:  # fmt: skip
        for param in params:
            name = f"{prefix}.{layer}.{path}.{param}"
            if name in names:
                roles[name] = (layer, path, param)
            elif param == "weight":
                raise PruneNetError(
                    f"Missing FFN tensor {name!r}: the checkpoint has no such tensor, so layer "
                    f"{layer} cannot be pruned. The checkpoint is incomplete or does not match "
                    "its config.json."
                )
    return roles


def _count_layers(config, prefix: str, names: Iterable[str]) -> int:
    """Layer count from the config, checked against the layer indices the checkpoint holds."""
    indices = set()
    for name in names:
        if name.startswith(prefix + "."):
            head = name[len(prefix) + 1 :].split(".", 1)[0]
            if head.isdigit():
                indices.add(int(head))
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    expected = getattr(text_config, "num_hidden_layers", None)
    count = expected if expected is not None else max(indices) + 1
    if max(indices) + 1 > count:
        raise PruneNetError(
            f"The checkpoint has tensors for {max(indices) + 1} layers under {prefix!r}, but "
            f"config.json says {count}."
        )
    return count
