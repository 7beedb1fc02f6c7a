"""The default path (own text, sequential analysis, policy scores, refit) one layer at a time.

`prunenet prune --layerwise` gives the same output as the in-memory default path (tests check
every tensor with `torch.equal`), but never holds more than one decoder layer's weights:

1. a skeleton of the model is built with its parameters on the meta device (no memory), and
   only what lies outside the decoder layers (embeddings, final norm, LM head) is read from the
   checkpoint's shards;
2. the model's own text is looked up in the analysis cache by the same weights fingerprint the
   in-memory path uses, computed by reading the parameters one at a time; only if it is not
   there is the whole model loaded (in its own dtype) to write it, once;
3. layer 0's inputs are captured from the embeddings alone (`layer_calls.capture_layer_inputs`
   never runs the layers), then `SequentialCut` walks the layers as in memory; before each
   layer's turn its weights are read from the shards, after it the cut and refitted layer is
   written as its own output shard and its weights go back to the meta device.

So the peak is one layer (raw, cut and its activations) plus the hidden states, whatever the
depth; DESIGN.md's 7B-shaped measurements motivate it (32 layers in memory would need ~30 GB).
The text phase is the exception when the text is not cached yet: generating needs every layer
at every token, so the model is resident then (13.5 GB for a 7B model in bf16); with
`--compute-dtype float32` it computes in float32 from its half weights (`core.upcast`). A model
that does not fit even in its own dtype writes its text with the layers streamed from the
shards at every token (`choose_text_route` picks).

Why this module is long: the lazy model, its text and the layer-by-layer cut share one
skeleton and its checkpoint-name resolution; split apart, each part would re-derive them.
"""

from __future__ import annotations

import gc
import json
import time
from functools import partial
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

# save_pretrained's own renaming (module names -> names on disk); internal to transformers 5, so
# imported in one place.
from transformers.core_model_loading import revert_weight_conversion

from prunenet.analysis.selfgen import SelfGenConfig, generate_own_text, own_text
from prunenet.analysis.sequential import ANALYSIS_SELFGEN, SequentialCut, announce_text
from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.compress import PruneReport, count_parameters, prune_model
from prunenet.core.refit import check_refit
from prunenet.core.upcast import float32_compute
from prunenet.errors import PruneNetError
from prunenet.io.models import load_model
from prunenet.io.remote_code import write_remote_code
from prunenet.io.saving import atomic_directory, write_records
from prunenet.io.stream.checkpoint import (
    INDEX_FILE,
    Checkpoint,
    available_memory_bytes,
    checkpoint_bytes,
    load_config,
    read_checkpoint,
    read_tensor,
)
from prunenet.io.stream.plan import resolve_layers_prefix
from prunenet.io.trust import NO_REMOTE_CODE
from prunenet.pipeline import Planner

OUTER_SHARD = "model-outer.safetensors"


class LazyModel:
    """A model whose decoder layers are loaded from a safetensors folder one at a time.

    :param folder: a checkpoint folder (`config.json`, safetensors shards).
    :param dtype: the dtype the weights are stored in (and the text is written in).
    :param compute_dtype: the dtype the layers are computed in (default `dtype`); float32 for
        a float16/bf16 checkpoint on a CPU without fast half-precision arithmetic.
    """

    def __init__(
        self, folder: str | Path, dtype: torch.dtype, compute_dtype: torch.dtype | None = None
    ) -> None:
        self.folder = Path(folder)
        self.dtype = dtype
        self.compute_dtype = compute_dtype or dtype
        self.checkpoint: Checkpoint = read_checkpoint(self.folder)
        self._names: dict[str, str | None] = {}  # model tensor name -> checkpoint name
        config = load_config(self.folder)
        self.adapter = adapter_for(config)
        # Parameters on meta, buffers real: rotary tables and embedding scales are computed
        # from the config at construction and are in no checkpoint.
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(
                config, dtype=self.compute_dtype, **NO_REMOTE_CODE
            )
        self.model.eval()
        self.layers = decoder_layers(self.model)
        self._prefix = resolve_layers_prefix(self.adapter, self.checkpoint.tensors)
        outer = [
            name
            for name, _ in self._named_tensors(self.model)
            if not name.startswith(self.adapter.layers + ".")
        ]
        self._load(self.model, outer)
        self.model.tie_weights()  # the LM head follows the freshly loaded embeddings again

    def load_layer(self, index: int) -> nn.Module:
        """Read decoder layer `index`'s weights from the shards (in `dtype`)."""
        layer = self.layers[index]
        prefix = f"{self.adapter.layers}.{index}."
        names = [prefix + name for name, _ in self._named_tensors(layer)]
        self._load(self.model, names, zero_missing_biases=True)
        return layer

    def release_layer(self, index: int, collect: bool = True) -> None:
        """Drop decoder layer `index`'s weights (back to the meta device).

        :param collect: run the garbage collector (once per layer when cutting; not on every
            token of a streamed generation, where the freed tensors have no cycles).
        """
        self.layers[index].to("meta")
        if collect:
            gc.collect()

    def dense_parameters(self):
        """(name, tensor) for every parameter of the dense model, read one at a time, in the
        order and with the deduplication of `named_parameters` (the cache's fingerprint)."""
        for name, parameter in self.model.named_parameters():
            if parameter.device.type != "meta" and parameter.dtype == self.dtype:
                yield name, parameter
            else:
                yield name, self._read(name).to(self.dtype)

    def _named_tensors(self, module: nn.Module):
        """Parameters and persistent buffers, as `state_dict` names them."""
        return module.state_dict(keep_vars=True).items()

    def _checkpoint_name(self, name: str) -> str | None:
        """The checkpoint's spelling of a model tensor name: as `save_pretrained` renames it
        (transformers keeps legacy names on disk, e.g. GPT-NeoX's `embed_out`), or with
        another prefix in front of the layers (checkpoints saved from the base model)."""
        if name in self._names:
            return self._names[name]
        candidates = [saved_name(self.model, name), name]
        if name.startswith(self.adapter.layers + "."):
            candidates.append(self._prefix + name[len(self.adapter.layers) :])
        else:
            base = self.adapter.layers.split(".")[0] + "."
            candidates.append(name[len(base) :] if name.startswith(base) else base + name)
        found = next((c for c in candidates if c in self.checkpoint.tensors), None)
        self._names[name] = found
        return found

    def _read(self, name: str) -> torch.Tensor:
        found = self._checkpoint_name(name)
        if found is None:
            raise PruneNetError(
                f"The checkpoint in {self.folder} has no tensor {name!r}; it does not match "
                "its config.json (truncated, or saved for another architecture)."
            )
        return read_tensor(self.checkpoint, found)

    def _load(self, model: nn.Module, names: list[str], zero_missing_biases: bool = False) -> None:
        tensors = {}
        for name in names:
            module_name, _, leaf = name.rpartition(".")
            current = model.get_submodule(module_name)._parameters.get(leaf)
            if self._checkpoint_name(name) is None and self._tied(name):
                continue
            if self._checkpoint_name(name) is None and zero_missing_biases and leaf == "bias":
                # `enable_output_biases` gave the layer a zero bias the checkpoint lacks.
                tensors[name] = torch.zeros(current.shape, dtype=self.compute_dtype)
                continue
            tensor = self._read(name)
            if current is not None and tuple(tensor.shape) != tuple(current.shape):
                raise PruneNetError(
                    f"Tensor {name!r} is {tuple(tensor.shape)} in the checkpoint but "
                    f"{tuple(current.shape)} in its config; the folder is inconsistent."
                )
            # Through the stored dtype: a float32 checkpoint computed in float32 but stored
            # in bf16 computes what the saved folder will.
            if tensor.is_floating_point():
                tensor = tensor.to(self.dtype).to(self.compute_dtype)
            tensors[name] = tensor
        model.load_state_dict(tensors, strict=False, assign=True)

    def _tied(self, name: str) -> bool:
        """Whether `name` is the LM head tied to the embeddings (absent from the checkpoint)."""
        output = self.model.get_output_embeddings()
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        if not tied or output is None:
            return False
        return name.startswith(_module_name(self.model, output) + ".")


def saved_name(model: nn.Module, name: str) -> str:
    """The name `save_pretrained` gives the model's tensor `name` on disk.

    transformers 5 renames some tensors between the modules and the files (its conversion
    mapping, reverted on save); this asks the same function `save_pretrained` uses.
    """
    renamed = list(revert_weight_conversion(model, {name: torch.empty(0)}))
    if len(renamed) != 1:
        raise PruneNetError(
            f"transformers converts {name!r} into {len(renamed)} tensors on save; --layerwise "
            "handles renamed tensors only. Prune this model without --layerwise."
        )
    return renamed[0]


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


class _Fingerprinted:
    """What `prunenet.io.cache.weights_fingerprint` and the text decoder read of a model."""

    def __init__(self, lazy: LazyModel) -> None:
        self.config = lazy.model.config
        self._lazy = lazy

    def named_parameters(self):
        return self._lazy.dense_parameters()

    def parameters(self):
        return (tensor for _, tensor in self._lazy.dense_parameters())


TEXT_ROUTES = ("auto", "resident", "streamed")
# The resident route needs the checkpoint plus the generation's own memory (KV cache, logits,
# a float32 copy of the embeddings): keep this share of the available memory free for them.
RESIDENT_SHARE = 0.8


def layerwise_text(
    lazy: LazyModel, selfgen: SelfGenConfig = ANALYSIS_SELFGEN, route: str = "auto"
) -> torch.Tensor:
    """The model's own text: from the analysis cache if this model wrote it before (found
    without loading the model), else written now (`write_text`).

    :param lazy: the model being pruned layer by layer (its checkpoint is `lazy.folder`).
    :param selfgen: how much text.
    :param route: how it is written if it is not cached: one of `TEXT_ROUTES`
        (`choose_text_route` says what `auto` picks).
    """
    return own_text(_Fingerprinted(lazy), selfgen, write=lambda: write_text(lazy, selfgen, route))


def choose_text_route(lazy: LazyModel, route: str = "auto") -> str:
    """`resident` when the whole checkpoint fits in `RESIDENT_SHARE` of the available memory,
    else `streamed`; an explicit route is returned as it is.

    Resident is the faster when it fits: streaming reads every layer from the shards at every
    token (`scripts/benchmark_scale.py --text-route` measures both).
    :param lazy: the model being pruned.
    :param route: one of `TEXT_ROUTES`.
    """
    if route not in TEXT_ROUTES:
        raise PruneNetError(
            f"Unknown text route {route!r}; choose one of {', '.join(TEXT_ROUTES)}."
        )
    if route != "auto":
        return route
    fits = checkpoint_bytes(lazy.folder) <= RESIDENT_SHARE * available_memory_bytes()
    return "resident" if fits else "streamed"


def write_text(lazy: LazyModel, selfgen: SelfGenConfig, route: str = "auto") -> torch.Tensor:
    """Generate the own text (no cache).

    `resident`: the whole model loaded once in `lazy.dtype` (computed in float32 from its half
    weights when `lazy.compute_dtype` is float32: `prunenet.core.upcast`), then freed.
    `streamed`: `lazy`'s own skeleton generates, each decoder layer read from the shards just
    before it runs and dropped after it, at every token, so only one layer (in
    `lazy.compute_dtype`) plus the KV cache is ever held. Both give the same tokens (tested).
    :param lazy: the model being pruned layer by layer (its checkpoint is `lazy.folder`).
    :param selfgen: how much text.
    :param route: one of `TEXT_ROUTES`.
    """
    announce_text(selfgen)
    if choose_text_route(lazy, route) == "streamed":
        return _streamed_text(lazy, selfgen)
    model, _ = load_model(str(lazy.folder), dtype=lazy.dtype)
    try:
        if lazy.compute_dtype != torch.float32:
            return generate_own_text(model, selfgen)
        with float32_compute(model):
            return generate_own_text(model, selfgen)
    finally:
        del model
        gc.collect()


def _streamed_text(lazy: LazyModel, selfgen: SelfGenConfig) -> torch.Tensor:
    def load(index, module, args, kwargs):
        lazy.load_layer(index)

    def release(index, module, args, kwargs, output):
        lazy.release_layer(index, collect=False)

    handles = []
    for index, layer in enumerate(lazy.layers):
        handles.append(layer.register_forward_pre_hook(partial(load, index), with_kwargs=True))
        handles.append(layer.register_forward_hook(partial(release, index), with_kwargs=True))
    try:
        return generate_own_text(lazy.model, selfgen)
    finally:
        for handle in handles:
            handle.remove()
        for index in range(len(lazy.layers)):  # an interrupted step may have left one loaded
            lazy.release_layer(index, collect=False)
        gc.collect()


class _LayerwiseCut:
    """`SequentialCut` with each layer loaded before its turn and written out after it."""

    def __init__(self, lazy: LazyModel, cut: SequentialCut, staging: Path) -> None:
        self.lazy, self.cut, self.staging = lazy, cut, staging
        self.weight_map: dict[str, str] = {}
        self.bytes_written = 0
        # Per layer: reading its weights; scoring, cutting, refitting and running it (the
        # hidden states for the next); writing its shard.
        self.seconds: dict[str, list[float]] = {"read": [], "cut": [], "write": []}

    def __call__(self, index, layer, scores, kept) -> torch.Tensor:
        start = time.perf_counter()
        self.lazy.load_layer(index)
        loaded = time.perf_counter()
        keep = self.cut(index, layer, scores, kept)
        cut = time.perf_counter()
        prefix = f"{self.lazy.adapter.layers}.{index}."
        tensors = {
            prefix + name: _stored(t, self.lazy.dtype) for name, t in layer.state_dict().items()
        }
        tensors = revert_weight_conversion(self.lazy.model, tensors)
        shard = f"model-layer-{index:05d}.safetensors"
        save_file(tensors, str(self.staging / shard), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, shard))
        self.bytes_written += sum(t.numel() * t.element_size() for t in tensors.values())
        self.lazy.release_layer(index)
        self.seconds["read"].append(loaded - start)
        self.seconds["cut"].append(cut - loaded)
        self.seconds["write"].append(time.perf_counter() - cut)
        return keep


def layerwise_prune(
    model_dir: str | Path,
    out: str | Path,
    planner: Planner,
    ratio: float,
    *,
    refit: str = "lsq",
    selfgen: SelfGenConfig = ANALYSIS_SELFGEN,
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype | None = None,
    tokenizer=None,
    overwrite: bool = False,
    text_route: str = "auto",
    record: dict | None = None,
    structures: dict | None = None,
) -> PruneReport:
    """Prune a safetensors checkpoint folder along the default path, one layer in memory.

    :param model_dir: folder with `config.json` and safetensors weights.
    :param out: output folder, written atomically.
    :param planner: decides how many rows each layer keeps and how layers are scored (a
        sequential plan scores each layer as it is reached).
    :param ratio: fraction of FFN rows removed (the planner's target).
    :param refit: `none`, `bias` or `lsq`, as in memory.
    :param selfgen: the model's own text the analysis and the refit run on.
    :param dtype: the dtype weights are written in (and the text is written in).
    :param compute_dtype: the dtype layers are computed in (default `dtype`); each cut layer is
        rounded to `dtype` before it runs, so the next layers see what the saved model gives.
        float32 on a CPU: half-precision matrix products are several times slower there.
    :param tokenizer: saved beside the model (None: the folder gets none).
    :param overwrite: replace an existing `out`.
    :param text_route: how the own text is written when it is not cached (`TEXT_ROUTES`).
    :param record: how the folder was made (`prunenet.runner`), written into it with the card.
    :param structures: the parameter budget this ratio meets, as its split
        (`prunenet.allocation.structures.ffn_split`), recorded in the report; None for a ratio.
    :return: the report, as `prunenet.pipeline.apply_plan` gives it, plus per-layer seconds.
    """
    start = time.perf_counter()
    check_refit(refit)
    lazy = LazyModel(model_dir, dtype, compute_dtype)
    route = choose_text_route(lazy, text_route)
    model = lazy.model
    plan = planner(model, ratio)
    text_start = time.perf_counter()
    tokens = layerwise_text(lazy, selfgen, route)
    text_seconds = time.perf_counter() - text_start
    params_before = count_parameters(model)
    out = Path(out).expanduser()
    with atomic_directory(out, overwrite) as staging:
        stored = None if lazy.compute_dtype == dtype else dtype
        sequential = SequentialCut(model, refit, tokens, plan.layer_score, stored_dtype=stored)
        cut = _LayerwiseCut(lazy, sequential, staging)
        report = prune_model(model, plan.scores, plan.layer_keep, target_ratio=ratio, cut=cut)
        report.params_before = params_before
        if structures is not None:
            report.structures = structures
        report.scorer = {**plan.info, "sequential": sequential.log.to_dict(), "layerwise": {
            "text_tokens": list(tokens.shape),
            "dtype": str(dtype).removeprefix("torch."),
            "compute_dtype": str(lazy.compute_dtype).removeprefix("torch."),
            "text_seconds": text_seconds,  # near 0 when the text was cached
            "text_route": route,  # how it was (or would have been) written
            "layer_seconds": [sum(parts) for parts in zip(*cut.seconds.values(), strict=True)],
            **{f"{part}_seconds": values for part, values in cut.seconds.items()},
        }}  # fmt: skip
        if tokenizer is not None:  # before `_write_outer`, whose last step cleans every file
            tokenizer.save_pretrained(staging)
        _write_outer(lazy, staging, cut)
        report.seconds = time.perf_counter() - start
        write_records(staging, report.to_dict(), record)
    return report


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()


def _write_outer(lazy: LazyModel, staging: Path, cut: _LayerwiseCut) -> None:
    """Everything outside the layers, the index, config and generation config."""
    model = lazy.model
    seen: set[int] = set()
    outer = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(lazy.adapter.layers + ".") or tensor.data_ptr() in seen:
            continue  # a tied LM head shares the embeddings' data: save_pretrained skips it
        seen.add(tensor.data_ptr())
        outer[name] = _stored(tensor, lazy.dtype)
    outer = revert_weight_conversion(model, outer)
    save_file(outer, str(staging / OUTER_SHARD), metadata={"format": "pt"})
    cut.weight_map.update(dict.fromkeys(outer, OUTER_SHARD))
    total = cut.bytes_written + sum(t.numel() * t.element_size() for t in outer.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(cut.weight_map.items()))}
    (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    model.config.architectures = [type(model).__name__]
    model.config.dtype = lazy.dtype
    model.config.save_pretrained(staging)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(staging)
    write_remote_code(staging)
