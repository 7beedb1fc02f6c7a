"""Size and speed: parameter counts (total and FFN) and forward-pass throughput.

forward passes over random tokens at a fixed batch and length, median latency over
  repeats after warm-up; tokens/s = batch x length / median latency. The full LM head runs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prunenet.core.arch import adapter_for, decoder_layers, ffn_modules, ffn_weights
from prunenet.core.compress import count_parameters
from prunenet.core.devices import describe_device, model_device, synchronize

DEFAULT_SPEED_BATCH = 1


DEFAULT_SPEED_SEQLEN = 256


DEFAULT_SPEED_REPEATS = 5


@dataclass
class SpeedResult:
    """Forward-pass latency and throughput at a fixed shape on one device."""

    device: str
    threads: int
    batch_size: int
    seqlen: int
    repeats: int
    latency_s: float
    latencies_s: list[float]
    tokens_per_second: float

    def to_dict(self) -> dict:
        return asdict(self)


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
    """Total parameters and those of the FFNs (found through `prunenet.core.arch`)."""
    adapter = adapter_for(model.config)
    ffn = 0
    widths = []
    for layer in decoder_layers(model):
        inputs, output = ffn_modules(layer, adapter)
        ffn += sum(p.numel() for module in [*inputs, output] for p in module.parameters())
        widths.append(ffn_weights(layer, adapter).width)
    total = count_parameters(model)
    return ParameterCounts(total=total, ffn=ffn, ffn_fraction=ffn / total, ffn_widths=widths)


@torch.inference_mode()
def measure_speed(
    model: nn.Module,
    batch_size: int = DEFAULT_SPEED_BATCH,
    seqlen: int = DEFAULT_SPEED_SEQLEN,
    repeats: int = DEFAULT_SPEED_REPEATS,
    warmup: int = 1,
    seed: int = 0,
) -> SpeedResult:
    """Median forward latency over `repeats` passes of random tokens (after `warmup` passes).

    The median, not the mean: on a shared CPU a single descheduled pass would dominate a mean.
    """
    device = model_device(model)
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, seqlen), generator=generator).to(device)
    latencies = []
    for index in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        model(input_ids=input_ids)
        synchronize(device)
        if index >= warmup:
            latencies.append(time.perf_counter() - start)
    latency = statistics.median(latencies)
    return SpeedResult(
        device=describe_device(device),
        threads=torch.get_num_threads(),
        batch_size=batch_size,
        seqlen=seqlen,
        repeats=repeats,
        latency_s=latency,
        latencies_s=latencies,
        tokens_per_second=batch_size * seqlen / latency,
    )
