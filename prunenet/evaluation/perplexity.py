"""Perplexity on fixed windows of a text, with BOS explicit and token counts reported.

Protocol (recorded in every `PerplexityResult`): the corpus is tokenized once without special
tokens; of its `len(ids) // seqlen` non-overlapping `seqlen`-token windows, `limit` are taken
evenly spaced through the text (so a few windows still sample all of it, not only its first
documents). Each window is fed as `[BOS] + window` when the tokenizer has a BOS token (all
`seqlen` tokens are scored), else bare (its first token has no context and is not scored).
BOS is prepended here rather than by the tokenizer because tokenizers (and transformers
versions) differ in whether they add it. Perplexity = exp(total NLL / scored tokens), the NLL
summed in float64. The same `TokenWindows` feed KL(dense || pruned)
(`prunenet.evaluation.divergence`), so both metrics cover exactly the same positions.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from prunenet.core.devices import model_device
from prunenet.errors import PruneNetError
from prunenet.evaluation.data import PERPLEXITY_TEXTS, text_sha256

DEFAULT_SEQLEN = 512
DEFAULT_PPL_WINDOWS = 16  # 16 x 512 = 8192 tokens per text: ~25 s per text for SmolLM2 on 1 CPU
PPL_TASKS: tuple[str, ...] = ("ppl_boolq", "ppl_lambada", "ppl_code")


@dataclass
class TokenWindows:
    """The exact token windows a perplexity (or KL) run scores.

    :param task: the text's name (`ppl_boolq`, ...), or any label.
    :param ids: `windows x seqlen` token ids, without BOS.
    :param bos_token_id: id prepended to every window, or None (then nothing is prepended).
    :param windows_available: how many non-overlapping windows the whole text holds.
    :param corpus_tokens: tokens in the whole text.
    :param text_sha256: sha256 of the text: equal hashes mean the same text.
    """

    task: str
    ids: torch.Tensor
    bos_token_id: int | None
    windows_available: int
    corpus_tokens: int
    text_sha256: str

    @property
    def seqlen(self) -> int:
        return int(self.ids.shape[1])

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])

    def model_inputs(self) -> torch.Tensor:
        """What the model is fed: `[BOS] + window` per row, or the bare windows without BOS."""
        if self.bos_token_id is None:
            return self.ids
        bos = torch.full((self.count, 1), self.bos_token_id, dtype=self.ids.dtype)
        return torch.cat([bos, self.ids], dim=1)


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
    text_sha256: str
    seconds: float

    kind = "perplexity"

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


def token_windows(
    tokenizer,
    text: str,
    seqlen: int,
    limit: int | None,
    task: str = "text",
    bos_id: int | None | str = "tokenizer",
) -> TokenWindows:
    """Tokenize `text` once and take `limit` of its `seqlen`-token windows, evenly spaced.

    :param tokenizer: a Hugging Face tokenizer (special tokens are not added by it).
    :param text: the whole corpus.
    :param seqlen: text tokens per window (BOS comes on top).
    :param limit: how many windows; None, 0 or more than the text holds: all of them.
    :param task: the text's name, for the result.
    :param bos_id: the id to prepend; "tokenizer" (default) takes the tokenizer's BOS, None
        prepends nothing.
    """
    if seqlen < 2:
        raise PruneNetError(f"--seqlen {seqlen} is too short; use at least 2 tokens.")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    available = len(ids) // seqlen
    if available == 0:
        raise PruneNetError(
            f"The text has {len(ids)} tokens, fewer than one window of --seqlen {seqlen}."
        )
    count = available if not limit or limit >= available else limit
    # Window i starts at window index floor(i * available / count): evenly spread, the first at
    # the text's start, identical for identical (text, tokenizer, seqlen, count).
    starts = [(i * available // count) * seqlen for i in range(count)]
    windows = torch.tensor([ids[s : s + seqlen] for s in starts], dtype=torch.long)
    bos = bos_token_id(tokenizer) if bos_id == "tokenizer" else bos_id
    return TokenWindows(task, windows, bos, available, len(ids), text_sha256(text))


def text_windows(tokenizer, task: str, seqlen: int, limit: int | None) -> TokenWindows:
    """The windows of the offline text `task` (`prunenet.evaluation.data.PERPLEXITY_TEXTS`).

    :param tokenizer: the models' tokenizer.
    :param task: `ppl_boolq`, `ppl_lambada` or `ppl_code`.
    :param seqlen: text tokens per window.
    :param limit: how many windows (None or 0: all).
    """
    from prunenet.evaluation.data import load_text

    return token_windows(tokenizer, load_text(task), seqlen, limit, task=task)


def token_nll(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of `inputs[:, 1:]` under `logits[:, :-1]` (float32 log-softmax).

    :param logits: `batch x length x vocab` logits of the whole input.
    :param inputs: `batch x length` token ids the logits were computed from.
    """
    predicted = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]), inputs[:, 1:].reshape(-1), reduction="none"
    )


@torch.inference_mode()
def perplexity(model: nn.Module, windows: TokenWindows, batch_size: int = 1) -> PerplexityResult:
    """exp(mean NLL) of `model` on `windows` (BOS prepended per window when they have one).

    :param model: a causal LM returning `.logits`.
    :param windows: from `token_windows` / `text_windows`.
    :param batch_size: windows per forward pass (memory grows with batch x seqlen x vocab).
    """
    start = time.perf_counter()
    device = model_device(model)
    total_nll = 0.0
    scored = 0
    for batch in windows.model_inputs().split(batch_size):
        batch = batch.to(device)
        nll = token_nll(model(input_ids=batch).logits, batch)
        # Summed in float64: 8k+ float32 terms would lose digits that separate close models.
        total_nll += nll.double().sum().item()
        scored += nll.numel()
    return perplexity_result(windows, total_nll, scored, time.perf_counter() - start)


def perplexity_result(
    windows: TokenWindows, total_nll: float, scored: int, seconds: float
) -> PerplexityResult:
    """The result record of a perplexity run over `windows` (shared with the KL pass).

    :param windows: what was scored.
    :param total_nll: summed NLL in nats.
    :param scored: how many tokens the sum covers.
    :param seconds: wall time of the scoring.
    """
    info = PERPLEXITY_TEXTS.get(windows.task)
    mean_nll = total_nll / scored
    return PerplexityResult(
        task=windows.task,
        title=info.title if info else windows.task,
        source=info.source if info else "text",
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        scored_tokens=scored,
        windows=windows.count,
        windows_available=windows.windows_available,
        corpus_tokens=windows.corpus_tokens,
        seqlen=windows.seqlen,
        bos_token_id=windows.bos_token_id,
        text_sha256=windows.text_sha256,
        seconds=seconds,
    )


def bos_token_id(tokenizer) -> int | None:
    """The tokenizer's BOS id, or None when it has none (then nothing is prepended).

    :param tokenizer: a Hugging Face tokenizer.
    """
    return getattr(tokenizer, "bos_token_id", None)
