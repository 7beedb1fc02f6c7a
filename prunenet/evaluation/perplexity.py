"""Perplexity on fixed windows of a text, with BOS explicit and token counts reported.

the corpus is tokenized once (no special tokens) and cut into consecutive,
  non-overlapping windows of `seqlen` tokens. Each window is fed as `[BOS] + window` where the
  tokenizer has a BOS (so every one of its `seqlen` tokens is predicted), else as the bare window
  (its first token has no context and is not scored). Perplexity = exp(total NLL / scored
  tokens). A window limit picks windows evenly spaced through the corpus, so a small limit still
  samples all of it rather than only its first documents.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from prunenet.core.devices import model_device
from prunenet.errors import PruneNetError
from prunenet.evaluation.data import PERPLEXITY_TEXTS

DEFAULT_SEQLEN = 512


DEFAULT_PPL_WINDOWS = 16  # 16 x 512 = 8192 tokens per text: ~30 s per text for SmolLM2 on 1 CPU


@dataclass
class PerplexityResult:
    """Perplexity of one text, with everything needed to reproduce or compare it."""

    task: str
    title: str
    source: str
    perplexity: float
    mean_nll: float
    scored_tokens: int
    windows: int
    windows_available: int
    corpus_tokens: int
    seqlen: int
    bos_token_id: int | None
    seconds: float

    kind = "perplexity"

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass
class TokenWindows:
    """The windows of one corpus that a perplexity run scores."""

    task: str
    windows: torch.Tensor  # n x seqlen token ids
    windows_available: int
    corpus_tokens: int


def token_windows(tokenizer, text: str, seqlen: int, limit: int | None, task: str = "text"):
    """Tokenize `text` once and take `limit` of its `seqlen`-token windows, evenly spaced."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    available = len(ids) // seqlen
    if available == 0:
        raise PruneNetError(
            f"The text has {len(ids)} tokens, fewer than one window of --seqlen {seqlen}."
        )
    count = available if not limit or limit >= available else limit
    starts = [(i * available // count) * seqlen for i in range(count)]
    windows = torch.tensor([ids[s : s + seqlen] for s in starts], dtype=torch.long)
    return TokenWindows(task, windows, available, len(ids))


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    windows: TokenWindows,
    bos_id: int | None,
    batch_size: int = 1,
    task: str | None = None,
) -> PerplexityResult:
    """exp(mean NLL) of `model` on `windows`, BOS prepended per window when `bos_id` is set."""
    start = time.perf_counter()
    device = model_device(model)
    total_nll = 0.0
    scored = 0
    for batch in windows.windows.split(batch_size):
        if bos_id is not None:
            batch = torch.cat([torch.full((len(batch), 1), bos_id), batch], dim=1)
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        log_probs = torch.log_softmax(logits, dim=-1)
        total_nll -= log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
        scored += targets.numel()
    name = task or windows.task
    info = PERPLEXITY_TEXTS.get(name)
    mean_nll = total_nll / scored
    return PerplexityResult(
        task=name,
        title=info.title if info else name,
        source=info.source if info else "text",
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        scored_tokens=scored,
        windows=len(windows.windows),
        windows_available=windows.windows_available,
        corpus_tokens=windows.corpus_tokens,
        seqlen=windows.windows.shape[1],
        bos_token_id=bos_id,
        seconds=time.perf_counter() - start,
    )


def bos_token_id(tokenizer) -> int | None:
    """The tokenizer's BOS id, or None when it has none (then nothing is prepended)."""
    return getattr(tokenizer, "bos_token_id", None)


def model_max_length(model: nn.Module) -> int:
    """Longest input the model's positions allow (lm-eval's fallback is 2048)."""
    config = model.config
    config = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048
