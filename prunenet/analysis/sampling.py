"""How the model writes its own text: batches that fit a memory budget, each with its own seed,
and the one draw per token that every batch makes.

`prunenet.analysis.selfgen` calls `generate` once per batch with these pieces: `batch_sizes`
splits the sequences so each batch's KV cache stays within `KV_CACHE_BUDGET`, `batch_seed` gives
each batch a seed that depends on the config alone, and `Sample` draws every token from the
model's full next-token distribution (Gumbel-max) with that batch's generator.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import LogitsProcessor

from prunenet.core.config_fields import built_head_counts, head_shapes

# The most bytes one generation batch's KV cache may take (`batch_sizes`): 68 of SmolLM2-135M's
# 256-token sequences in float32, so its default text is 4 batches of 64. A decode step at batch
# 64 wrote 127 tokens/s here against 107 at 43 (the 512 MB budget before), and the text stage's
# peak stays below the cut's (docs/scale.md); 86 per batch (1 GB) gained 8% more but would put
# the text stage above 2 GB. The budget depends on nothing about the machine, so the same config
# writes the same text everywhere.
KV_CACHE_BUDGET = 768 << 20


def kv_cache_bytes(model_config, length: int, dtype: torch.dtype) -> int:
    """Bytes of one sequence's KV cache at `length` positions: keys and values of every layer's
    KV heads (as the modeling code builds them) in `dtype`. Sliding-window layers are counted at
    full length: an upper bound.

    :param model_config: a supported model's config.
    :param length: positions.
    :param dtype: the dtype the cache is kept in (the model's).
    """
    built = built_head_counts(model_config)
    shapes = head_shapes(model_config)
    per_position = sum(
        2 * kv * shape.head_dim for (_, kv), shape in zip(built, shapes, strict=True)
    )
    return per_position * length * dtype.itemsize


def batch_sizes(
    model_config, sequences: int, length: int, dtype: torch.dtype, budget: int = KV_CACHE_BUDGET
) -> list[int]:
    """How many sequences each generation batch writes: as few batches as keep each batch's KV
    cache within `budget` bytes, as equal as possible (earlier batches one larger).

    :param model_config: a supported model's config.
    :param sequences: sequences in all.
    :param length: tokens per sequence.
    :param dtype: the model's dtype.
    :param budget: bytes one batch's KV cache may take.
    """
    per_batch = max(1, budget // max(1, kv_cache_bytes(model_config, length, dtype)))
    count = -(-sequences // per_batch)
    base, extra = divmod(sequences, count)
    return [base + 1] * extra + [base] * (count - extra)


def batch_seed(seed: int, index: int) -> int:
    """The seed of generation batch `index` of a text seeded `seed`: `seed` itself for the first
    batch (so a text of one batch is that seed's text, and batch `b` of any text is the one-batch
    text of `batch_seed(seed, b)`), then 32 bits of a SHA-256 of both, the same on every machine
    and Python (unlike `hash`) and within 2**32 - 1 (`MAX_SEED`).

    :param seed: the config's seed.
    :param index: the batch's position, from 0.
    """
    if index == 0:
        return seed
    digest = hashlib.sha256(f"prunenet-selfgen:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


class Sample(LogitsProcessor):
    """Draws one token per row from softmax(scores) with `generator`, by the Gumbel-max trick:
    the argmax of the scores plus one Gumbel noise per vocabulary entry, and returns scores that
    are 0 at the drawn token and -inf elsewhere, so `generate`'s greedy step picks it.

    Why Gumbel-max and not one uniform per row through the cumulative distribution (sampler 2,
    3x cheaper per step: ~8 ms against ~23 ms for 43 x 49,152 scores on 2 threads, ~4% of a
    step): rounding moves every boundary of a cumulative distribution, so the drawn token
    changed wherever the uniform fell near one. A tiny Llama run in bfloat16 and in float32
    from the same weights wrote different tokens at 5% of the positions (and so different
    texts and cuts), against none with Gumbel-max, where a draw changes only when the two best
    noisy scores nearly tie. The same holds for the last bits that thread counts and machines
    change in float32. `torch.multinomial` (the same race, with exponentials drawn in float64)
    took ~80 ms.

    :param generator: this batch's generator, on the model's device.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(scores.shape, generator=self.generator, dtype=torch.float32,
                           device=scores.device)  # fmt: skip
        # -log(-log(u)) is Gumbel; a u of exactly 0 gives -inf: that entry is never drawn.
        chosen = (scores.float() - noise.log_().neg_().log_()).argmax(dim=-1, keepdim=True)
        picked = torch.full_like(scores, float("-inf"))
        return picked.scatter_(1, chosen, 0.0)
