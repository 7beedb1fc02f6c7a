"""Activations on text the model writes itself: the data-free window into what each neuron does.

PruneNet promises calibration-free pruning: no external dataset is ever read. Weights alone
predicted quality poorly on SmolLM2 (every weights-only criterion we tried lost to random
selection), but the model can provide its own inputs: sample a few sequences from its start
token and record each FFN's intermediate activations on them. These samples carry the model's
own token statistics, which is what makes activation-based scores work without any corpus.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from numbers import Integral

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from prunenet.analysis.sampling import KV_CACHE_BUDGET, Sample, batch_seed, batch_sizes
from prunenet.core.arch import adapter_for, decoder_layers, max_positions
from prunenet.core.config_fields import ffn_widths
from prunenet.core.memory import trim_heap
from prunenet.core.surgery import ffn_modules
from prunenet.errors import PruneNetError
from prunenet.io.cache import CacheEntryError, Info, Tensors, memoize, stored_tensor

# The largest seed every generator PruneNet seeds accepts: numpy's legacy seeding (which SB3
# uses) stops at 2**32 - 1, torch's at 2**64 - 1, numpy's default_rng refuses negatives.
MAX_SEED = 2**32 - 1
# SelfGenConfig's fields: (name, smallest, largest, why). Length 1 is the start token alone,
# with nothing sampled: `generate` refuses it. The upper bounds only catch typos (2**20
# tokens per sequence would already be days of generation).
LIMITS = (
    ("sequences", 1, 1 << 20, "sequences the model writes"),
    ("length", 2, 1 << 20, "tokens per sequence: the start token and at least one sampled"),
    ("seed", 0, MAX_SEED, "what every random generator PruneNet seeds accepts"),
    ("kept_tokens", 1, 1 << 30, "activation rows kept per layer"),
)
# The KV cache `generate` uses: transformers' StaticCache, allocated once per batch, where the
# default DynamicCache concatenates every layer's keys and values at every token. It was 4-6%
# faster here and ~100 MB leaner per 43 x 256 batch (docs/scale.md, "Threads and generation
# speed"). No torch.compile, which `generate` would otherwise start for a static cache on a GPU.
GENERATE_CACHE: dict = {"cache_implementation": "static", "disable_compile": True}
# What the cached text and activations are keyed with besides the config: the sampler's version
# (2: batched, one seeded generator per batch, inverse CDF; 3: the same with Gumbel-max draws),
# so text written by an earlier sampler is never read back as this one's.
SAMPLER = {"sampler": 3}
# Rows per block in `layer_activations` (bounds its temporaries to ~50 MB at 1536 columns).
STATISTICS_ROWS = 8192


@dataclass(frozen=True)
class SelfGenConfig:
    """How much text the model writes for itself.

    :param sequences: number of sampled sequences.
    :param length: tokens per sequence (including the start token).
    :param seed: sampling seed; the same seed gives the same text and so the same scores.
    :param kept_tokens: activation rows kept per layer for rewards (a seeded subsample).
    """

    sequences: int = 8
    length: int = 128
    seed: int = 0
    kept_tokens: int = 256

    def __post_init__(self) -> None:
        # Every caller (prune, pareto, train, recover, scripts, Python) builds one of these, so
        # values that would fail deep inside `generate` or a seeded RNG are refused here.
        for name, low, high, why in LIMITS:
            value = getattr(self, name)
            whole = isinstance(value, Integral) and not isinstance(value, bool)
            if not whole or not low <= value <= high:
                raise PruneNetError(
                    f"Self-generated text: {name} {repr(value)[:40]} must be a whole number from "
                    f"{low:,} to {high:,} ({why})."
                )


@dataclass
class LayerActivations:
    """One layer's FFN intermediate activations on self-generated text.

    :param rms: per-neuron root-mean-square activation over all tokens.
    :param mean_abs: per-neuron mean absolute activation.
    :param max_abs: per-neuron maximum absolute activation (outlier neurons).
    :param sample: `kept_tokens x d_ff` activation rows, for function-preservation rewards.
    """

    rms: torch.Tensor
    mean_abs: torch.Tensor
    max_abs: torch.Tensor
    sample: torch.Tensor


def cache_settings(config: SelfGenConfig) -> dict:
    """What the cached text and activations of `config` are keyed with: its fields, the
    sampler's version (`SAMPLER`) and the batch budget (`KV_CACHE_BUDGET`: it decides which
    sequences share a batch and so a seed, so another budget writes another text).

    :param config: how much text.
    """
    return {**asdict(config), **SAMPLER, "kv_cache_budget": KV_CACHE_BUDGET}


def start_token_id(model: nn.Module) -> int:
    """The token generation starts from: BOS, else the decoder start, else EOS."""
    for source in (model.generation_config, model.config):
        for field in ("bos_token_id", "decoder_start_token_id", "eos_token_id"):
            value = getattr(source, field, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


@torch.no_grad()
def generate_own_text(
    model: nn.Module, config: SelfGenConfig, cache_budget: int = KV_CACHE_BUDGET
) -> torch.Tensor:
    """`sequences x length` token ids sampled by the model from its start token.

    The sequences are written in batches whose KV cache fits `cache_budget` bytes
    (`batch_sizes`): one batch of all 256 default sequences held a 3 GB cache that the default
    cache copied at every token. Batch `b` samples with its own generator seeded by
    `batch_seed(config.seed, b)`, so the text depends on the config, the model and its dtype only,
    never on the machine, and the global RNG is left untouched. Every token is drawn from the
    model's full next-token distribution (no top-k, top-p or temperature) with its end token
    banned, so every sequence runs to `length`.

    A model that cannot see `length` positions (learned position tables, as GPT-2 and OPT have)
    writes as many as it can: sampling past its table would index out of range.

    :param model: the model; the tokens are on its device.
    :param config: how much text, and the seed.
    :param cache_budget: the most bytes one batch's KV cache may take (at least one sequence
        per batch whatever it is).
    """
    length = config.length
    limit = max_positions(model.config)
    if limit is not None and length > limit:
        print(
            f"prunenet: the model sees at most {limit} positions; writing {limit}-token "
            f"sequences instead of {length}",
            file=sys.stderr,
        )
        length = limit
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype  # the checkpoint's own (`prunenet prune --dtype`)
    sizes = batch_sizes(model.config, config.sequences, length, dtype, cache_budget)
    start_id = start_token_id(model)
    batches = f" in {len(sizes)} batches of up to {sizes[0]}" if len(sizes) > 1 else ""
    bar = tqdm(
        total=config.sequences * (length - 1),
        desc=f"writing {config.sequences} x {length} tokens of own text{batches}",
        unit="token",
        leave=False,
    )
    written = []
    with bar:
        for index, size in enumerate(sizes):
            generator = torch.Generator(device=device).manual_seed(batch_seed(config.seed, index))
            start = torch.full((size, 1), start_id, dtype=torch.long, device=device)
            # Greedy decoding over scores that `Sample` reduced to one finite entry per row: the
            # sample is drawn by `Sample` with this batch's generator, not by `generate`.
            written.append(model.generate(
                start,
                attention_mask=torch.ones_like(start),
                do_sample=False,
                temperature=None,
                top_k=None,
                top_p=None,
                max_length=length,
                min_length=length,  # bans the end token: every sequence runs to `length`
                pad_token_id=start_id,
                logits_processor=LogitsProcessorList(
                    [_RefuseNaN(dtype), Sample(generator), _Progress(bar)]
                ),
                **GENERATE_CACHE,
            ))  # fmt: skip
    # The cache and the logits are freed now; without this their heap blocks stayed resident
    # under the cut that follows (`prunenet.core.memory`).
    trim_heap()
    return torch.cat(written)


class _RefuseNaN(LogitsProcessor):
    """Stops generation with a clear error when the next-token logits hold NaN: a model run in
    float16 whose activations overflow it (65504) gives NaN logits, and sampling from them
    fails deep inside `generate` without saying why. Finite scores pass through unchanged.

    :param dtype: the model's dtype, named in the error.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = str(dtype).removeprefix("torch.")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if bool(torch.isnan(scores).any()):
            raise PruneNetError(
                f"The model's next-token logits are NaN while it writes its own text in "
                f"{self.dtype}. {overflow_hint(self.dtype)}"
            )
        return scores


def overflow_hint(dtype: str) -> str:
    """What to do about non-finite activations of a model run in `dtype` (a name, `float16`).

    :param dtype: the dtype the model ran in.
    """
    if dtype == "float16":
        return (
            "Its activations overflow float16 (largest value 65504): prune with --dtype "
            "bfloat16 (the same memory, float32's range) or --dtype float32."
        )
    return "Check the checkpoint's weights for inf or NaN."


class _Progress(LogitsProcessor):
    """Advances a progress bar by the tokens of each generated position; the scores pass through
    unchanged (so the sampled text is the same with or without it)."""

    def __init__(self, bar) -> None:
        self.bar = bar

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.bar.update(scores.shape[0])  # one token per sequence of the batch
        return scores


def collect_activations(
    model: nn.Module, config: SelfGenConfig | None = None
) -> list[LayerActivations]:
    """Per-layer FFN activation statistics on the model's own text (cached per model)."""
    config = config or SelfGenConfig()
    widths = ffn_widths(model.config)
    return memoize(
        "activations",
        model,
        cache_settings(config),
        lambda: _collect_activations(model, config),
        encode=_encode_activations,
        decode=lambda tensors, info: _decode_activations(tensors, info, widths, config),
    )


@torch.no_grad()
def _collect_activations(model: nn.Module, config: SelfGenConfig) -> list[LayerActivations]:
    tokens = generate_own_text(model, config)
    return activations_on(model, tokens, config.kept_tokens, config.seed)


@torch.no_grad()
def activations_on(
    model: nn.Module, tokens: torch.Tensor, kept_tokens: int, seed: int
) -> list[LayerActivations]:
    """Per-layer FFN activation statistics of `model` on `tokens`, one forward pass. Each
    layer's statistics are taken inside the pass, so only one layer's activations exist at a
    time (all of them, for every layer, were 1.4 GB on SmolLM2 at 60 x 128 tokens).

    :param model: the model.
    :param tokens: sequences x length ids (e.g. part of the run's own text).
    :param kept_tokens: activation rows each layer's seeded sample keeps.
    :param seed: which rows.
    """
    adapter = adapter_for(model.config)
    layers = decoder_layers(model)
    stats: list[LayerActivations | None] = [None] * len(layers)
    handles = []
    for index, layer in enumerate(layers):
        _, output = ffn_modules(layer, adapter)

        def hook(module, inputs, index=index):
            acts = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            stats[index] = layer_activations(acts, kept_tokens, seed)
            if index == len(layers) - 1:
                # Nothing after the last FFN is needed: its logits (tokens x vocabulary floats,
                # 1.5 GB for SmolLM2 at 60 x 128 tokens) set a run's peak.
                raise _LastLayerRead

        handles.append(output.register_forward_pre_hook(hook))
    try:
        model(tokens, use_cache=False)
    except _LastLayerRead:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return stats


class _LastLayerRead(Exception):
    """Raised from the last layer's hook once every layer's statistics are taken."""


def layer_activations(acts: torch.Tensor, kept_tokens: int, seed: int) -> LayerActivations:
    """Statistics of one layer's `tokens x d_ff` activations, and a seeded row sample.

    :param acts: the FFN output projection's inputs, one row per token (float32).
    :param kept_tokens: how many rows the sample keeps.
    :param seed: which rows (the same seed samples the same rows).
    """
    generator = torch.Generator().manual_seed(seed)
    sample_rows = torch.randperm(acts.shape[0], generator=generator)[:kept_tokens]
    # A block of rows at a time, sums in float64: whole-size temporaries (squares, absolute
    # values) were 300 MB each at the default text.
    squares = torch.zeros(acts.shape[1], dtype=torch.float64, device=acts.device)
    sums, peaks = torch.zeros_like(squares), squares.new_zeros(acts.shape[1], dtype=torch.float32)
    for block in acts.split(STATISTICS_ROWS):
        magnitude = block.float().abs()
        squares += magnitude.pow(2).sum(dim=0, dtype=torch.float64)
        sums += magnitude.sum(dim=0, dtype=torch.float64)
        peaks = torch.maximum(peaks, magnitude.amax(dim=0))
    count = max(acts.shape[0], 1)
    return LayerActivations(
        rms=(squares / count).sqrt().float().cpu(),
        mean_abs=(sums / count).float().cpu(),
        max_abs=peaks.cpu(),
        sample=acts[sample_rows.to(acts.device)].float().cpu(),
    )


def _encode_activations(layers: list[LayerActivations]) -> tuple[Tensors, Info]:
    """Tensors named `<layer>.<field>` (`3.rms`), and the layer count."""
    tensors = {
        f"{index}.{field.name}": getattr(layer, field.name)
        for index, layer in enumerate(layers)
        for field in fields(LayerActivations)
    }
    return tensors, {"layers": len(layers)}


def _decode_activations(
    tensors: Tensors, info: Info, widths: list[int], config: SelfGenConfig
) -> list[LayerActivations]:
    """A stored entry's activations, if they have this model's layers and widths (float32,
    finite) and one sample size no larger than `config.kept_tokens`; else `CacheEntryError`."""
    if info.get("layers") != len(widths):
        raise CacheEntryError(f"{info.get('layers')} layers stored, the model has {len(widths)}")
    layers = [
        LayerActivations(
            rms=stored_tensor(tensors, f"{index}.rms", torch.float32, (width,)),
            mean_abs=stored_tensor(tensors, f"{index}.mean_abs", torch.float32, (width,)),
            max_abs=stored_tensor(tensors, f"{index}.max_abs", torch.float32, (width,)),
            sample=stored_tensor(tensors, f"{index}.sample", torch.float32, (None, width)),
        )
        for index, width in enumerate(widths)
    ]
    rows = {layer.sample.shape[0] for layer in layers}
    if len(rows) > 1 or any(not 0 < count <= config.kept_tokens for count in rows):
        raise CacheEntryError(f"sample rows {sorted(rows)} for kept_tokens={config.kept_tokens}")
    return layers


def own_text(
    model: nn.Module, config: SelfGenConfig, write: Callable[[], torch.Tensor] | None = None
) -> torch.Tensor:
    """`generate_own_text`, cached per model weights and config (token ids only: generating
    64 x 128 tokens takes minutes on a CPU, reading them back milliseconds).

    :param model: the model (anything whose `named_parameters` give its weights, for the key).
    :param config: how much text.
    :param write: writes the text when it is not cached (default: `generate_own_text` on
        `model`; `prunenet.layerwise` loads the model only then).
    """
    return memoize(
        "selfgen-text",
        model,
        cache_settings(config),
        write or (lambda: generate_own_text(model, config)),
        encode=lambda tokens: ({"tokens": tokens.cpu()}, {}),
        decode=lambda tensors, info: _decode_text(tensors, model, config),
    )


def _decode_text(tensors: Tensors, model: nn.Module, config: SelfGenConfig) -> torch.Tensor:
    """Stored token ids, if they are `sequences x <= length` ids within the vocabulary."""
    tokens = stored_tensor(tensors, "tokens", torch.int64, (config.sequences, None))
    vocab = getattr(model.config, "vocab_size", None)
    if not 0 < tokens.shape[1] <= config.length:
        raise CacheEntryError(f"{tokens.shape[1]} tokens per sequence, asked for {config.length}")
    if tokens.min() < 0 or (vocab is not None and tokens.max() >= vocab):
        raise CacheEntryError("token ids outside the vocabulary")
    return tokens.to(next(model.parameters()).device)
