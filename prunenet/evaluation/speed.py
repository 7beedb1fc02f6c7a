"""Size and speed: parameter counts, and prefill/decode tokens/s of a model against its reference.

Why alternate: on a shared 2-core machine the available CPU drifts by tens of percent within
minutes (other jobs, thermal state). Timing the dense model for a minute and then the pruned one
measures that drift as much as the pruning. Here every round times both models back to back, the
order flips every round (A B, B A, A B, ...) so a linear drift hits both equally, and the
speed-up is reported next to the spread of each model's samples, so a reader sees whether a
1.05x is real or noise.

Measurements (each one: one warm-up call per model, then `rounds` alternated timed calls):

- `prefill`: one forward pass over batch 1 x `prefill_tokens` random token ids (fixed seed);
  tokens/s = prefill_tokens / wall time. The full LM head runs.
- `decode`: greedy `generate` (`do_sample=False`, `num_beams=1`, KV cache on) of exactly
  `max_new_tokens` tokens (`min_new_tokens` = `max_new_tokens`, so EOS cannot stop it early)
  after a `prompt_tokens` random prompt, at each batch size in `decode_batch_sizes`;
  tokens/s = batch x max_new_tokens / wall time of the whole `generate` call (the short prompt's
  prefill included).

Speed-up = median tokens/s of the model / median tokens/s of the reference, per measurement
(> 1: the model is faster). `paired_speedup` is the median of the per-round ratios, which also
cancels drift between rounds. Without a reference (`measure_speed`), the same calls are
timed on the one model: absolute tokens/s only, and no speed-up.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.compress import count_parameters
from prunenet.core.devices import describe_device, model_device, synchronize
from prunenet.core.surgery import ffn_modules, ffn_weights

# One timed call; returns how many tokens it processed (prefilled or generated).
Runner = Callable[[], int]
Clock = Callable[[], float]

DEFAULT_PREFILL_TOKENS = 512
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_PROMPT_TOKENS = 16
DEFAULT_DECODE_BATCH_SIZES: tuple[int, ...] = (1, 8)
DEFAULT_ROUNDS = 5
DEFAULT_WARMUP = 1
REFERENCE = "reference"
MODEL = "model"


# --------------------------------------------------------------------------- results


@dataclass
class Spread:
    """Summary of one model's tokens/s samples in one measurement.

    :param median: median tokens/s.
    :param minimum: slowest sample.
    :param maximum: fastest sample.
    :param q1: first quartile (inclusive method; equals the minimum side for few samples).
    :param q3: third quartile.
    :param samples: every timed sample, in round order.
    """

    median: float
    minimum: float
    maximum: float
    q1: float
    q3: float
    samples: list[float]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread:
        values = list(samples)
        if len(values) >= 2:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        else:
            q1 = q3 = values[0]
        return cls(statistics.median(values), min(values), max(values), q1, q3, values)

    @property
    def relative_range(self) -> float:
        """(max - min) / median: how noisy this model's samples were."""
        return (self.maximum - self.minimum) / self.median


@dataclass
class SpeedRow:
    """One measurement (e.g. decode at batch 8) of the model against the reference.

    :param measurement: `prefill` or `decode`.
    :param batch_size: sequences per call.
    :param tokens_per_call: tokens each call processes (prefilled, or generated over the batch).
    :param reference: the reference model's tokens/s (None: timed without a reference).
    :param model: the compared model's tokens/s.
    :param speedup: median(model) / median(reference); > 1 means the model is faster (None
        without a reference).
    :param paired_speedup: median over rounds of model / reference within the same round.
    :param call_order: every call as (phase, label), phase `warmup` or `timed`, in call order.
    """

    measurement: str
    batch_size: int
    tokens_per_call: int
    reference: Spread | None
    model: Spread
    speedup: float | None
    paired_speedup: float | None
    call_order: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class SpeedComparison:
    """Speed of a model against its reference, with the settings that make it reproducible.

    :param rows: one `SpeedRow` per measurement.
    :param rounds: timed calls per model per measurement.
    :param warmup: untimed calls per model before the rounds.
    :param prefill_tokens: prefill length (batch 1).
    :param prompt_tokens: prompt length before decoding.
    :param max_new_tokens: tokens generated per sequence (exactly).
    :param seed: seed of the random token ids.
    :param threads: `torch.get_num_threads()` while timing.
    :param omp_num_threads: the `OMP_NUM_THREADS` environment variable (None: unset).
    :param device: what the timing ran on.
    :param torch_version: torch version.
    :param transformers_version: transformers version (None when not installed).
    :param seconds: wall time of the whole comparison.
    """

    rows: list[SpeedRow]
    rounds: int
    warmup: int
    prefill_tokens: int
    prompt_tokens: int
    max_new_tokens: int
    seed: int
    threads: int
    omp_num_threads: str | None
    device: str
    torch_version: str
    transformers_version: str | None
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- public entry points


@dataclass
class ParameterCounts:
    """Total and FFN parameters; the FFN is what PruneNet removes."""

    total: int
    ffn: int
    ffn_fraction: float
    ffn_widths: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Total parameters and those of the FFNs (found through `prunenet.core.surgery`)."""
    adapter = adapter_for(model.config)
    ffn = 0
    widths = []
    for layer in decoder_layers(model):
        inputs, output = ffn_modules(layer, adapter)
        ffn += sum(p.numel() for module in [*inputs, output] for p in module.parameters())
        widths.append(ffn_weights(layer, adapter).width)
    total = count_parameters(model)
    return ParameterCounts(total=total, ffn=ffn, ffn_fraction=ffn / total, ffn_widths=widths)


def compare_speed(
    reference_model: nn.Module | None,
    model: nn.Module,
    prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    decode_batch_sizes: Sequence[int] = DEFAULT_DECODE_BATCH_SIZES,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    rounds: int = DEFAULT_ROUNDS,
    warmup: int = DEFAULT_WARMUP,
    seed: int = 0,
) -> SpeedComparison:
    """Prefill and decode tokens/s of `model` and `reference_model`, alternated round by round.

    Both models must live on the same device and share a vocabulary (the same token ids are
    fed to both). Pass the same model twice to see the noise floor (speed-up ~1.0).

    :param reference_model: the dense model (None: time `model` alone, no speed-up).
    :param model: the pruned model.
    :param prefill_tokens: tokens of the batch-1 prefill pass.
    :param max_new_tokens: tokens generated per sequence in the decode measurements.
    :param decode_batch_sizes: batch sizes of the decode measurements.
    :param prompt_tokens: random prompt length before decoding.
    :param rounds: timed calls per model per measurement (at least 5 for a usable spread).
    :param warmup: untimed calls per model first (allocator, kernel selection, caches).
    :param seed: seed of the random token ids (the same ids for both models).
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds {rounds} must be >= 1 and warmup {warmup} >= 0.")
    start = time.perf_counter()
    device = model_device(model)
    vocab = _vocab_size(model)
    if reference_model is not None:
        vocab = min(vocab, _vocab_size(reference_model))
    generator = torch.Generator().manual_seed(seed)
    prefill_ids = torch.randint(0, vocab, (1, prefill_tokens), generator=generator).to(device)
    rows = [
        compare_runners(
            "prefill",
            1,
            _optional(prefill_runner, reference_model, prefill_ids),
            prefill_runner(model, prefill_ids),
            rounds,
            warmup,
        )
    ]
    for batch_size in decode_batch_sizes:
        prompt = torch.randint(0, vocab, (batch_size, prompt_tokens), generator=generator)
        prompt = prompt.to(device)
        rows.append(
            compare_runners(
                "decode",
                batch_size,
                _optional(decode_runner, reference_model, prompt, max_new_tokens),
                decode_runner(model, prompt, max_new_tokens),
                rounds,
                warmup,
            )
        )
    return SpeedComparison(
        rows=rows,
        rounds=rounds,
        warmup=warmup,
        prefill_tokens=prefill_tokens,
        prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens,
        seed=seed,
        threads=torch.get_num_threads(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        device=describe_device(device),
        torch_version=torch.__version__,
        transformers_version=_transformers_version(),
        seconds=time.perf_counter() - start,
    )


def compare_runners(
    measurement: str,
    batch_size: int,
    reference: Runner | None,
    model: Runner,
    rounds: int = DEFAULT_ROUNDS,
    warmup: int = DEFAULT_WARMUP,
    clock: Clock = time.perf_counter,
) -> SpeedRow:
    """The timing core: alternate two runners and summarise their tokens/s.

    Warm-up: `warmup` calls of each, reference first. Round r then times reference, model when
    r is even and model, reference when r is odd, so drift that grows through the run is
    charged to both equally.

    :param measurement: name for the row (`prefill`, `decode`).
    :param batch_size: sequences per call, for the row.
    :param reference: the reference's call; returns the tokens it processed (None: time the
        model alone, no speed-up).
    :param model: the compared model's call; returns the tokens it processed.
    :param rounds: timed calls per runner.
    :param warmup: untimed calls per runner before the rounds.
    :param clock: seconds counter; tests pass a fake one to make costs exact.
    """
    runners = {MODEL: model} if reference is None else {REFERENCE: reference, MODEL: model}
    call_order: list[tuple[str, str]] = []
    rates: dict[str, list[float]] = {REFERENCE: [], MODEL: []}
    tokens_per_call = 0
    for _ in range(warmup):
        for label in runners:
            call_order.append(("warmup", label))
            runners[label]()
    for round_index in range(rounds):
        order = list(runners) if round_index % 2 == 0 else list(runners)[::-1]
        for label in order:
            call_order.append(("timed", label))
            started = clock()
            tokens = runners[label]()
            elapsed = clock() - started
            if elapsed <= 0:
                raise RuntimeError(f"The clock did not advance over a {measurement} call.")
            rates[label].append(tokens / elapsed)
            tokens_per_call = tokens
    model_spread = Spread.of(rates[MODEL])
    reference_spread = Spread.of(rates[REFERENCE]) if reference is not None else None
    speedup = paired = None
    if reference_spread is not None:
        speedup = model_spread.median / reference_spread.median
        ratios = [m / r for m, r in zip(rates[MODEL], rates[REFERENCE], strict=True)]
        paired = statistics.median(ratios)
    return SpeedRow(
        measurement=measurement,
        batch_size=batch_size,
        tokens_per_call=tokens_per_call,
        reference=reference_spread,
        model=model_spread,
        speedup=speedup,
        paired_speedup=paired,
        call_order=call_order,
    )


def prefill_runner(model: nn.Module, input_ids: torch.Tensor) -> Runner:
    """One forward pass of `model` over `input_ids`; returns the tokens processed.

    :param model: a causal LM.
    :param input_ids: `batch x length` token ids on the model's device.
    """

    @torch.inference_mode()
    def run() -> int:
        model(input_ids=input_ids)
        synchronize(input_ids.device)
        return input_ids.numel()

    return run


def decode_runner(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int) -> Runner:
    """Greedy generation of exactly `max_new_tokens` per sequence; returns tokens generated.

    :param model: a causal LM with `generate` (transformers `GenerationMixin`).
    :param prompt: `batch x length` prompt ids on the model's device (no padding).
    :param max_new_tokens: tokens to generate per sequence.
    """
    from transformers import GenerationConfig

    eos = getattr(model.generation_config, "eos_token_id", None)
    pad = getattr(model.generation_config, "pad_token_id", None)
    # min_new_tokens = max_new_tokens suppresses EOS, so every call does the same work; an
    # explicit config, not the model's, so sampling settings shipped with a model cannot leak in.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else (eos if eos is not None else 0),
    )
    attention_mask = torch.ones_like(prompt)
    expected = prompt.shape[0] * max_new_tokens

    @torch.inference_mode()
    def run() -> int:
        output = model.generate(
            input_ids=prompt, attention_mask=attention_mask, generation_config=config
        )
        synchronize(prompt.device)
        generated = (output.shape[1] - prompt.shape[1]) * output.shape[0]
        if generated != expected:
            raise RuntimeError(
                f"generate produced {generated} tokens instead of {expected}; the decode "
                "measurement needs a fixed token count."
            )
        return generated

    return run


# --------------------------------------------------------------------------- helpers


def _optional(make: Callable[..., Runner], model: nn.Module | None, *args) -> Runner | None:
    return None if model is None else make(model, *args)


def _vocab_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().num_embeddings)


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__
