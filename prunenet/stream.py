"""Stream-prune a safetensors checkpoint folder layer by layer, with memory bounded by one layer.

PruneNet needs no forward pass: a weights-only scorer looks at one layer's FFN at a time. So a
7B model can be pruned on a laptop by never building the model at all: read each layer's FFN
tensors from the checkpoint's shards, score and cut them, and write new shards tensor by tensor,
copying every other tensor through unchanged (same names, same dtype, same shard grouping).

Why the result is bit-identical to in-memory pruning (`prune_model` + `save_pretrained`): each
layer's FFN tensors are hung on a small module "shell" laid out like the real layer, so the same
`surgery.ffn_weights` builds the scorer's neuron-first view, the same
`compress.select_keep_indices` picks the rows and the same `surgery.cut_ffn` cuts them.
Checkpoint names come from the adapter row (layers path + index + module path +
".weight"/".bias"); the only thing learned from the files is the prefix in front of the layers
path, because checkpoints differ there ("model.decoder..." versus "decoder...").

Why memory stays bounded: `safe_open` maps a shard and `get_tensor` returns a tensor backed by
that map, so every page read counts in the process's RSS until the map is released. Each tensor
is therefore read through its own short-lived handle and dropped after it is written, and each
output shard is written incrementally (header first, then one tensor at a time) instead of being
assembled in memory, because real checkpoints ship 5-10 GB shards. Peak memory is one layer's FFN
(raw + cut) plus the scorer's work, whatever the model's or the shards' size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prunenet.core.arch import FFNWeights, adapter_for
from prunenet.core.compress import PruneReport, record_ffn_widths, select_keep_indices
from prunenet.core.devices import resolve_device
from prunenet.core.ratios import validate_ratio
from prunenet.core.surgery import cut_ffn, ffn_weights, layer_shell, shell_tensors
from prunenet.errors import PruneNetError
from prunenet.io.output_checks import check_free_space, check_output_path
from prunenet.io.remote_code import write_remote_code
from prunenet.io.saving import atomic_directory, write_records
from prunenet.io.stream.checkpoint import (
    available_memory_bytes,
    checkpoint_bytes,
    load_config,
    read_checkpoint,
    read_tensor,
    record_weights_dtype,
)
from prunenet.io.stream.plan import plan_pruning
from prunenet.io.stream.writer import copy_side_files, verify_output, write_index, write_shard
from prunenet.scoring.base import Scorer

# Above this fraction of available RAM, the CLI streams instead of loading the model.
AUTO_STREAM_FRACTION = 0.5


@dataclass
class StreamReport(PruneReport):
    """A `PruneReport` plus where the time went, so large runs can be compared and planned.

    :param layer_seconds: per layer, seconds spent reading, scoring and cutting its FFN.
    :param device: where scoring ran (`cpu`, `cuda`, ...).
    :param bytes_read: checkpoint bytes read (FFN tensors twice when a layer spans shards).
    :param bytes_written: bytes of tensor data written.
    """

    layer_seconds: list[float] = field(default_factory=list)
    device: str = "cpu"
    bytes_read: int = 0
    bytes_written: int = 0


def stream_prune(
    model_dir: str | Path,
    out: str | Path,
    scorer: Scorer,
    ratio: float,
    *,
    layer_ratios: list[float] | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    record: dict | None = None,
    structures: dict | None = None,
) -> StreamReport:
    """Prune the FFN of every layer of a safetensors checkpoint folder without loading the model.

    :param model_dir: folder with `config.json` and `model.safetensors` or a sharded index.
    :param out: output folder; written atomically (nothing appears there unless all succeeds).
    :param scorer: a weights-only scorer (`scorer.weights_only`); it sees one layer at a time,
        with that layer's target ratio (as `score_layer(..., ratio=...)`).
    :param ratio: fraction of FFN rows removed in every layer, in (0, 1).
    :param layer_ratios: per-layer ratios; defaults to `ratio` everywhere.
    :param device: where the scorer's tensors go (`cuda` for GPU spectral work); cutting and
        writing stay on the CPU.
    :param overwrite: replace an existing `out`.
    :param progress: called with one line per written shard (the CLI prints them).
    :param record: how the folder was made (`prunenet.runner`), written into it with the card.
    :param structures: the parameter budget this ratio meets, as its split
        (`prunenet.allocation.structures.ffn_split`), recorded in the report; None for a ratio.
    """
    start = time.perf_counter()
    require_weights_only(scorer)
    ratio = validate_ratio(ratio)
    device = resolve_device(device)
    folder = Path(model_dir).expanduser()
    out = check_output_path(out, overwrite)
    if out.resolve() == folder.resolve():
        raise PruneNetError(f"--out {out} is the input folder; choose another output folder.")
    config = load_config(folder)
    adapter = adapter_for(config)
    checkpoint = read_checkpoint(folder)
    plan = plan_pruning(adapter, config, checkpoint, ratio, layer_ratios)
    check_free_space(out, plan.output_bytes)
    pruner = _LayerPruner(checkpoint, plan, adapter, scorer, device)
    bytes_written = 0
    with atomic_directory(out, overwrite) as staging:
        for number, shard in enumerate(checkpoint.shards, start=1):
            shard_start = time.perf_counter()
            entries = plan.output_entries(checkpoint, shard)
            bytes_written += write_shard(
                staging / shard, entries, checkpoint.shard_metadata[shard], pruner.tensor
            )
            if progress is not None:
                size = sum(e.nbytes for e in entries)
                progress(
                    f"shard {number}/{len(checkpoint.shards)} {shard}: {size / 1e9:.2f} GB in "
                    f"{time.perf_counter() - shard_start:.1f} s"
                )
        verify_output(staging, checkpoint, plan)
        if checkpoint.index_metadata is not None:
            write_index(staging, checkpoint, plan)
        record_ffn_widths(config, plan.widths_after)
        record_weights_dtype(config, checkpoint)
        config.save_pretrained(staging)
        copy_side_files(folder, staging)
        write_remote_code(staging)  # per-layer widths: loadable without prunenet too
        report = StreamReport(
            model_type=config.model_type,
            num_layers=plan.num_layers,
            ffn_width_before=plan.width,
            ffn_widths_after=plan.widths_after,
            params_before=plan.params_before,
            params_after=plan.params_after,
            target_ratio=ratio,
            scorer=scorer.describe(),
            layer_seconds=pruner.layer_seconds,
            device=str(device),
            bytes_read=pruner.bytes_read,
            bytes_written=bytes_written,
        )
        if structures is not None:
            report.structures = structures
        report.seconds = time.perf_counter() - start
        write_records(staging, report.to_dict(), record)
    return report


def require_weights_only(scorer: Scorer) -> None:
    """Refuse scorers that need a forward pass: stream mode never builds the model."""
    if not scorer.weights_only:
        raise PruneNetError(
            f"Scorer {scorer.name!r} needs the model's forward pass (weights_only=False), so it "
            "cannot run in stream mode, which never loads the whole model. Use a weights-only "
            "scorer (e.g. magnitude or random), or prune in memory without --stream."
        )


def should_stream(model_dir: str | Path) -> tuple[bool, int, int]:
    """Whether loading the model would crowd RAM: (stream?, checkpoint bytes, available bytes).

    Loading needs at least the checkpoint's size (more when it is upcast), so above half of the
    available memory the CLI streams instead.
    """
    size = checkpoint_bytes(model_dir)
    available = available_memory_bytes()
    return size > AUTO_STREAM_FRACTION * available, size, available


class _LayerPruner:
    """Hands out output tensors by name: FFN tensors cut, everything else as stored.

    The first FFN tensor of a layer triggers reading that layer's whole FFN (from whatever
    shards hold it), scoring it and cutting it; the other cut tensors of that layer wait in
    `pending` for their turn. Only one layer is pending at a time: if shard order ever asks for
    an older layer again, it is re-read and re-cut from its cached scores (same result).
    """

    def __init__(self, checkpoint, plan, adapter, scorer, device) -> None:
        self.checkpoint = checkpoint
        self.plan = plan
        self.adapter = adapter
        self.scorer = scorer
        self.device = device
        self.scores: dict[int, torch.Tensor] = {}
        self.pending: dict[str, torch.Tensor] = {}
        self.layer_seconds = [0.0] * plan.num_layers
        self.bytes_read = 0

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.plan.roles:
            self.bytes_read += self.checkpoint.tensors[name].nbytes
            return read_tensor(self.checkpoint, name)
        if name not in self.pending:
            self._cut_layer(self.plan.roles[name][0])
        return self.pending.pop(name)

    @torch.no_grad()
    def _cut_layer(self, layer: int) -> None:
        start = time.perf_counter()
        self.pending = {}  # release the previous layer before reading the next
        names = self.plan.layer_tensors[layer]
        roles = {name: self.plan.roles[name] for name in names}
        tensors = {name: read_tensor(self.checkpoint, name) for name in names}
        self.bytes_read += sum(self.checkpoint.tensors[n].nbytes for n in names)
        shell = layer_shell(tensors, roles)
        del tensors
        if layer not in self.scores:
            self.scores[layer] = self._score(ffn_weights(shell, self.adapter), layer)
        keep = select_keep_indices(self.scores[layer], self.plan.kept[layer])
        cut_ffn(shell, self.adapter, keep)
        self.pending = shell_tensors(shell, roles)
        self.layer_seconds[layer] += time.perf_counter() - start

    def _score(self, ffn: FFNWeights, layer: int) -> torch.Tensor:
        if self.device.type != "cpu":
            ffn = FFNWeights([w.to(self.device) for w in ffn.inputs], ffn.output.to(self.device))
        scores = self.scorer.score_layer(
            ffn, layer, self.plan.num_layers, ratio=self.plan.ratios[layer]
        )
        if scores.numel() != self.plan.width:
            raise PruneNetError(
                f"Scorer {self.scorer.name!r} returned {scores.numel()} scores for layer "
                f"{layer}, whose FFN width is {self.plan.width}."
            )
        return scores.detach().cpu()
