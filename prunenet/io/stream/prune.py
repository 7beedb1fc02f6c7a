"""Stream-prune a safetensors checkpoint folder layer by layer, with memory bounded by one layer.

PruneNet needs no forward pass: a weights-only scorer looks at one layer's FFN at a time. So a
7B model can be pruned on a laptop by never building the model at all: read each layer's FFN
tensors from the checkpoint's shards, score and cut them, and write new shards tensor by tensor,
copying every other tensor through unchanged (same names, same dtype, same shard grouping).

Why the result is bit-identical to in-memory pruning (`prune_model` + `save_pretrained`): each
layer's FFN tensors are hung on a small module "shell" laid out like the real layer, so the same
`arch.ffn_weights` builds the scorer's neuron-first view, the same `compress.select_keep_indices`
picks the rows and the same `arch.cut_ffn` cuts them. Checkpoint names come from the adapter row
(layers path + index + module path + ".weight"/".bias"); the only thing learned from the files
is the prefix in front of the layers path, because checkpoints differ there ("model.decoder..."
versus "decoder...").

Why memory stays bounded: `safe_open` maps a shard and `get_tensor` returns a tensor backed by
that map, so every page read counts in the process's RSS until the map is released. Each tensor
is therefore read through its own short-lived handle and dropped after it is written, and each
output shard is written incrementally (header first, then one tensor at a time) instead of being
assembled in memory, because real checkpoints ship 5-10 GB shards. Peak memory is one layer's FFN
(raw + cut) plus the scorer's work, whatever the model's or the shards' size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig

from prunenet.core.arch import Adapter, FFNWeights, adapter_for, cut_ffn, ffn_weights, ffn_width
from prunenet.core.compress import PruneReport, record_ffn_widths, select_keep_indices
from prunenet.core.ratios import keep_count, validate_ratio
from prunenet.errors import PruneNetError
from prunenet.io.saving import REPORT_FILE, atomic_directory, check_free_space, check_output_path
from prunenet.scoring.base import Scorer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Weight files in other formats are not copied: they would hold the unpruned model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_REWRITTEN = {CONFIG_FILE, INDEX_FILE, REPORT_FILE}
# Bytes per element of the safetensors dtype names (the header stores names, not torch dtypes).
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
                "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                "I64": 8, "U64": 8, "F64": 8}  # fmt: skip
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                 "F64": torch.float64}  # fmt: skip
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
        _verify_output(staging, checkpoint, plan)
        if checkpoint.index_metadata is not None:
            _write_index(staging, checkpoint, plan)
        record_ffn_widths(config, plan.widths_after)
        record_weights_dtype(config, checkpoint)
        config.save_pretrained(staging)
        copy_side_files(folder, staging)
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
        report.seconds = time.perf_counter() - start
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    return report


def require_weights_only(scorer: Scorer) -> None:
    """Refuse scorers that need a forward pass: stream mode never builds the model."""
    if not scorer.weights_only:
        raise PruneNetError(
            f"Scorer {scorer.name!r} needs the model's forward pass (weights_only=False), so it "
            "cannot run in stream mode, which never loads the whole model. Use a weights-only "
            "scorer (e.g. magnitude or random), or prune in memory without --stream."
        )


def resolve_device(name: str | torch.device) -> torch.device:
    """A torch device that exists on this machine, or a clear error (never assume a GPU)."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise PruneNetError(f"Unknown device {name!r} ({error}); use cpu or cuda.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PruneNetError(
            f"--device {name} was requested but this torch build sees no CUDA GPU "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False). Use --device cpu, "
            "or install a CUDA build of torch on a machine with an NVIDIA GPU."
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PruneNetError(f"--device {name} was requested but MPS is not available here.")
    return device


def should_stream(model_dir: str | Path) -> tuple[bool, int, int]:
    """Whether loading the model would crowd RAM: (stream?, checkpoint bytes, available bytes).

    Loading needs at least the checkpoint's size (more when it is upcast), so above half of the
    available memory the CLI streams instead.
    """
    size = checkpoint_bytes(model_dir)
    available = available_memory_bytes()
    return size > AUTO_STREAM_FRACTION * available, size, available


def checkpoint_bytes(model_dir: str | Path) -> int:
    """Total size of the safetensors files the folder's index (or single file) refers to."""
    folder = Path(model_dir).expanduser()
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError):
            return 0
    else:
        shards = {SINGLE_FILE}
    return sum((folder / s).stat().st_size for s in shards if (folder / s).is_file())


def available_memory_bytes() -> int:
    """Memory the kernel can hand out without swapping (`MemAvailable`), else free pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def load_config(folder: Path):
    """The checkpoint's config, or a clear error when the folder is not a local HF model."""
    if not (folder / CONFIG_FILE).is_file():
        raise PruneNetError(
            f"{folder} holds no config.json. Stream mode reads a local folder written by "
            "save_pretrained (download hub models first, e.g. with `hf download`)."
        )
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise PruneNetError(f"Could not read {folder / CONFIG_FILE}: {error}") from error


def record_weights_dtype(config, checkpoint: Checkpoint) -> None:
    """Record the weights' dtype on the config and every sub-config, as `from_pretrained` does.

    In-memory pruning saves a config whose `dtype` (and each sub-config's) names the loaded
    weights' dtype; stream mode keeps the checkpoint's dtype, so it writes the same fields.
    """
    dtype = getattr(config, "dtype", None) or _checkpoint_float_dtype(checkpoint)
    if dtype is None:
        return
    config.dtype = dtype
    for key in getattr(config, "sub_configs", {}):
        sub_config = getattr(config, key, None)
        if sub_config is not None:
            sub_config.dtype = dtype


def _checkpoint_float_dtype(checkpoint: Checkpoint) -> torch.dtype | None:
    """The floating dtype holding most of the checkpoint's bytes."""
    totals: dict[str, int] = {}
    for entry in checkpoint.tensors.values():
        if entry.dtype in _FLOAT_DTYPES:
            totals[entry.dtype] = totals.get(entry.dtype, 0) + entry.nbytes
    return _FLOAT_DTYPES[max(totals, key=totals.get)] if totals else None


# --- reading the checkpoint -------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it (shape after pruning in output plans)."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPE_BYTES[self.dtype]


@dataclass
class Checkpoint:
    """A checkpoint folder's tensors, read from shard headers only (no tensor data).

    :param tensors: name -> entry, for every tensor the index (or the single file) lists.
    :param shards: shard file names in order.
    :param shard_metadata: each shard's `__metadata__` (kept in the output shards).
    :param index_metadata: the index's `metadata`, or None for a single-file checkpoint.
    """

    folder: Path
    tensors: dict[str, TensorEntry]
    shards: list[str]
    shard_metadata: dict[str, dict[str, str] | None]
    index_metadata: dict | None

    def path(self, name: str) -> Path:
        return self.folder / self.tensors[name].shard


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Validate every shard's header up front, so a broken checkpoint fails before any writing."""
    folder = Path(folder)
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = dict(index["weight_map"])
        except (ValueError, KeyError, TypeError) as error:
            raise PruneNetError(
                f"{index_path} is not a valid safetensors index ({type(error).__name__}: "
                f"{error}); it needs a 'weight_map' from tensor names to shard files."
            ) from None
        index_metadata = dict(index.get("metadata") or {})
        shards = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        weight_map, index_metadata, shards = None, None, [SINGLE_FILE]
    else:
        raise PruneNetError(
            f"{folder} has no {SINGLE_FILE} and no {INDEX_FILE}; stream mode reads safetensors "
            "checkpoints only. Convert once with from_pretrained + save_pretrained, or prune "
            "without --stream."
        )
    tensors: dict[str, TensorEntry] = {}
    shard_metadata = {}
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            raise PruneNetError(
                f"{INDEX_FILE} names the shard {shard}, but {path} does not exist; the "
                "checkpoint is incomplete (re-download the missing shard)."
            )
        try:
            with safe_open(path, framework="pt") as handle:
                present = set(handle.keys())
                names = [n for n, s in weight_map.items() if s == shard] if weight_map else present
                missing = [n for n in names if n not in present]
                if missing:
                    raise PruneNetError(
                        f"{INDEX_FILE} says {missing[0]!r} (and {len(missing) - 1} more) is in "
                        f"{shard}, but that shard does not contain it; the checkpoint is "
                        "inconsistent."
                    )
                for name in sorted(names):
                    view = handle.get_slice(name)
                    dtype = view.get_dtype()
                    if dtype not in _DTYPE_BYTES:
                        raise PruneNetError(
                            f"Tensor {name!r} in {shard} has dtype {dtype}, which stream mode "
                            "cannot copy; prune without --stream."
                        )
                    tensors[name] = TensorEntry(name, shard, dtype, tuple(view.get_shape()))
                shard_metadata[shard] = handle.metadata()
        except (SafetensorError, OSError) as error:
            raise PruneNetError(
                f"Shard {path} cannot be read: {error}. It is probably truncated or corrupt "
                "(an interrupted download or copy); re-download it."
            ) from None
    return Checkpoint(folder, tensors, shards, shard_metadata, index_metadata)


def read_tensor(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    """One tensor through its own short-lived handle.

    The tensor is backed by the shard's memory map; closing the handle here means the map (and
    the pages it has touched, which count in RSS) is released as soon as the tensor is dropped.
    """
    with safe_open(checkpoint.path(name), framework="pt") as handle:
        return handle.get_tensor(name)


# --- planning: which tensors are FFN weights, and their shapes after pruning -------------------


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
        return sorted(entries, key=lambda e: (-_DTYPE_BYTES[e.dtype], e.name))


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
        shell = _layer_shell(
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
        for name, cut in _shell_tensors(shell, roles).items():
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


# --- the layer shell: real module layout, checkpoint tensors -----------------------------------


def _layer_shell(tensors: dict[str, torch.Tensor], roles: dict[str, tuple[int, str, str]]):
    """A bare module tree shaped like one decoder layer's FFN, holding the given tensors.

    `arch.ffn_weights` and `arch.cut_ffn` walk module paths and read `.weight`/`.bias`, so on
    this shell they do exactly what they do on the loaded model.
    """
    root = nn.Module()
    for name, (_, path, param) in roles.items():
        module = root
        for part in path.split("."):
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(param, nn.Parameter(tensors[name], requires_grad=False))
    return root


def _shell_tensors(shell: nn.Module, roles: dict[str, tuple[int, str, str]]):
    tensors = {}
    for name, (_, path, param) in roles.items():
        module = shell
        for part in path.split("."):
            module = getattr(module, part)
        tensors[name] = getattr(module, param).detach()
    return tensors


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
        shell = _layer_shell(tensors, roles)
        del tensors
        if layer not in self.scores:
            self.scores[layer] = self._score(ffn_weights(shell, self.adapter), layer)
        keep = select_keep_indices(self.scores[layer], self.plan.kept[layer])
        cut_ffn(shell, self.adapter, keep)
        self.pending = _shell_tensors(shell, roles)
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


# --- writing ------------------------------------------------------------------------------------


def write_shard(
    path: Path,
    entries: list[TensorEntry],
    metadata: dict[str, str] | None,
    tensor_for: Callable[[str], torch.Tensor],
) -> int:
    """Write one safetensors file incrementally: header first, then one tensor at a time.

    `safetensors.torch.save_file` needs the whole shard in memory (5-10 GB for real checkpoints);
    here every shape is known before any data is read, so the header (the format's documented
    8-byte length + JSON with contiguous `data_offsets`) can be written first and each tensor
    dropped right after its bytes are written. Returns the bytes of tensor data written.
    """
    if sys.byteorder != "little":
        raise PruneNetError("Stream mode writes safetensors (little-endian) on little-endian CPUs.")
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # tensor data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)))
        file.write(header_bytes)
        for entry in entries:
            tensor = tensor_for(entry.name)
            if tuple(tensor.shape) != entry.shape or tensor.nbytes != entry.nbytes:
                raise RuntimeError(
                    f"Bug: {entry.name} came out as {tuple(tensor.shape)} {tensor.dtype}, "
                    f"planned {entry.shape} {entry.dtype}."
                )
            file.write(_raw_bytes(tensor))
            del tensor
    return offset


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().reshape(-1).contiguous()
    return memoryview(flat.view(torch.uint8).numpy())


def _verify_output(staging: Path, checkpoint: Checkpoint, plan: PruningPlan) -> None:
    """Re-open every written shard with safetensors itself: its header checks (offsets cover
    the file exactly, dtypes and shapes parse) guard the hand-written header."""
    for shard in checkpoint.shards:
        with safe_open(staging / shard, framework="pt") as handle:
            for entry in plan.output_entries(checkpoint, shard):
                view = handle.get_slice(entry.name)
                if tuple(view.get_shape()) != entry.shape or view.get_dtype() != entry.dtype:
                    raise RuntimeError(f"Bug: {shard} holds a wrong header for {entry.name}.")


def _write_index(staging: Path, checkpoint: Checkpoint, plan: PruningPlan) -> None:
    metadata = dict(checkpoint.index_metadata or {})
    metadata["total_size"] = plan.output_bytes
    if "total_parameters" in metadata:
        metadata["total_parameters"] = plan.params_after
    weight_map = {name: checkpoint.tensors[name].shard for name in sorted(checkpoint.tensors)}
    index = {"metadata": metadata, "weight_map": weight_map}
    (staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def copy_side_files(source: Path, staging: Path) -> list[str]:
    """Copy tokenizer, generation config and other small top-level files verbatim.

    Weight files (any format) and files this module rewrites are skipped, and so are folders
    (hub repos keep e.g. the original consolidated weights in `original/`).
    """
    copied = []
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name in _REWRITTEN or path.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(path, staging / path.name)
        copied.append(path.name)
    return copied
