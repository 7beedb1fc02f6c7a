"""How much to cut for a speed target: the smallest FFN ratio whose cut model runs S x faster.

A speed-up depends on the shapes left, not on which rows go, so a trial cuts a copy of the
model to a ratio's widths keeping its first rows (no scoring, no text) and times batch-1
prefill against the dense model, the two alternated round by round
(`prunenet.evaluation.speed.compare_runners`, paired median). The ratios are bisected between
0 and the most the FFN may lose. Measured speed-ups carry this machine's noise (a few percent
between identical runs here), so the chosen ratio is a measurement: it is recorded with every
trial, and the pruned folder should be timed again with `prunenet eval --reference`.
"""

from __future__ import annotations

import copy
import gc
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prunenet.allocation.structures import MAX_FFN_RATIO
from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.config_fields import ffn_widths
from prunenet.core.devices import model_device
from prunenet.core.ratios import uniform_keep
from prunenet.core.surgery import cut_ffn
from prunenet.errors import PruneNetError
from prunenet.evaluation.speed import compare_runners, prefill_runner

SEARCH_PREFILL_TOKENS = 256
SEARCH_ROUNDS = 3
SEARCH_STEPS = 6  # bisection steps: the ratio to within MAX_FFN_RATIO / 2**6 = 0.014


@dataclass
class SpeedSearch:
    """The ratio found for a target speed-up, and every ratio timed on the way.

    :param target: the requested prefill speed-up.
    :param ratio: the smallest ratio timed at or above the target.
    :param speedup: its measured speed-up.
    :param trials: (ratio, measured speed-up) in the order timed.
    :param prefill_tokens: tokens of each timed prefill (batch 1).
    :param rounds: alternated timed calls per model and trial.
    :param threads: torch threads during the timing.
    """

    target: float
    ratio: float
    speedup: float
    trials: list[tuple[float, float]] = field(default_factory=list)
    prefill_tokens: int = SEARCH_PREFILL_TOKENS
    rounds: int = SEARCH_ROUNDS
    threads: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def check_target_speedup(target: float) -> float:
    """`target` if it asks for a real speed-up (> 1), else a clear error."""
    if not target > 1:
        raise PruneNetError(
            f"--target-speedup {target} must be above 1 (a prefill speed-up over the dense "
            "model, e.g. 1.2 for 20% more tokens per second)."
        )
    return float(target)


def ratio_for_speedup(
    model: nn.Module,
    target: float,
    prefill_tokens: int = SEARCH_PREFILL_TOKENS,
    rounds: int = SEARCH_ROUNDS,
    steps: int = SEARCH_STEPS,
) -> SpeedSearch:
    """The smallest FFN ratio (rows removed in every layer) whose cut times `target` x faster.

    :param model: the dense model (left unchanged).
    :param target: prefill speed-up to reach, > 1.
    :param prefill_tokens: tokens of the batch-1 prefill timed per call.
    :param rounds: alternated timed calls per model per trial (after one warm-up call each).
    :param steps: bisection steps after the check at the largest ratio.
    :raises PruneNetError: when even `MAX_FFN_RATIO` of the rows does not reach the target.
    """
    check_target_speedup(target)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (1, prefill_tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model_device(model))
    dense = prefill_runner(model, ids)
    search = SpeedSearch(target, MAX_FFN_RATIO, 0.0, [], prefill_tokens, rounds,
                         torch.get_num_threads())  # fmt: skip

    def timed(ratio: float) -> float:
        shaped = _shaped_like_cut(model, ratio)
        row = compare_runners("prefill", 1, dense, prefill_runner(shaped, ids), rounds, warmup=1)
        del shaped
        gc.collect()
        search.trials.append((ratio, float(row.paired_speedup)))
        return float(row.paired_speedup)

    best = timed(MAX_FFN_RATIO)
    if best < target:
        raise PruneNetError(
            f"--target-speedup {target}: removing {MAX_FFN_RATIO:.0%} of every layer's FFN rows "
            f"(the most PruneNet takes) gave a prefill speed-up of {best:.2f} here "
            f"({prefill_tokens} tokens, batch 1, {torch.get_num_threads()} thread(s)); ask for "
            "less, or use --remove-params with --structures layers."
        )
    low, high, high_speedup = 0.0, MAX_FFN_RATIO, best
    for _ in range(steps):
        middle = round((low + high) / 2, 4)
        speedup = timed(middle)
        if speedup >= target:
            high, high_speedup = middle, speedup
        else:
            low = middle
    search.ratio, search.speedup = high, high_speedup
    return search


def _shaped_like_cut(model: nn.Module, ratio: float) -> nn.Module:
    """A copy of `model` with each layer's FFN cut to `ratio` (its first rows: only the shapes
    matter for speed)."""
    shaped = copy.deepcopy(model)
    adapter = adapter_for(shaped.config)
    keep = uniform_keep(ffn_widths(shaped.config), ratio)
    for layer, kept in zip(decoder_layers(shaped), keep, strict=True):
        cut_ffn(layer, adapter, torch.arange(kept))
    return shaped.eval()
