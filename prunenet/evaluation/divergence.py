"""How far a pruned model's next-token distributions are from the dense one's: KL(dense || pruned).

Perplexity only looks at the probability of the token that happened to come next; the KL looks
at the whole distribution at every position, so it separates pruned models whose perplexities
are close, and it needs no labels.

Definition (recorded as `KLResult.definition`): for every scored position t of every window,
KL_t = sum_v p(v | x_<t) (log p(v | x_<t) - log q(v | x_<t)), with p the reference (dense) model
and q the compared one, both from `log_softmax` in float64; reported: the mean of KL_t over
positions, the maximum, and the count. The positions are exactly those a perplexity run on the
same `TokenWindows` scores, and the compared model's perplexity comes out of the same forward
passes (`kl_and_perplexity`), so adding KL costs only the reference's passes, or nothing when
they are cached (`ReferenceCache`: the benchmark compares many pruned models with one dense).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prunenet.core.devices import model_device
from prunenet.errors import PruneNetError
from prunenet.evaluation.perplexity import (
    PerplexityResult,
    TokenWindows,
    perplexity_result,
    token_nll,
)

# Positions per float64 vocabulary-wide step: 128 positions x 49k vocab x 8 bytes is ~50 MB per
# tensor and the KL needs a few of them, so long windows are processed in slices.
_POSITIONS_PER_CHUNK = 128

DEFINITION = (
    "mean over scored positions of sum_v p(v) (log p(v) - log q(v)), p = reference (dense) "
    "model, q = evaluated model, log_softmax in float64; positions = those perplexity scores "
    "on the same windows"
)


@dataclass
class KLResult:
    """KL(reference || model) of next-token distributions over one text's windows.

    :param task: the text (`ppl_boolq`, ...).
    :param mean_kl: mean per-token KL in nats.
    :param max_kl: largest per-token KL in nats.
    :param tokens: positions averaged over.
    :param windows: windows used.
    :param seqlen: text tokens per window.
    :param bos_token_id: BOS prepended to every window (None: none).
    :param text_sha256: sha256 of the text the windows come from.
    :param seconds: wall time (both models' forward passes included).
    :param definition: what exactly was computed.
    """

    task: str
    mean_kl: float
    max_kl: float
    tokens: int
    windows: int
    seqlen: int
    bos_token_id: int | None
    text_sha256: str
    seconds: float
    definition: str = DEFINITION

    kind = "kl"

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass
class ReferenceCache:
    """The reference model's logits per (text, batch), kept on the CPU to be reused.

    Memory: windows x (seqlen + 1) x vocab x 4 bytes per text (16 x 513 x 49k: 1.6 GB for
    SmolLM2), so the benchmark enables it and `prunenet eval` (one comparison) does not.
    """

    logits: dict[tuple[str, str, int], torch.Tensor] = field(default_factory=dict)


@torch.inference_mode()
def kl_and_perplexity(
    reference_model: nn.Module,
    model: nn.Module,
    windows: TokenWindows,
    batch_size: int = 1,
    cache: ReferenceCache | None = None,
) -> tuple[KLResult, PerplexityResult]:
    """KL(reference_model || model) and `model`'s perplexity on `windows`, in one pass.

    A model compared with itself gives exactly 0: the two log-probability tensors are bitwise
    equal, so every term is exactly zero.

    :param reference_model: the dense model (p).
    :param model: the compared (pruned) model (q); same vocabulary as the reference.
    :param windows: from `perplexity.token_windows` / `perplexity.text_windows`.
    :param batch_size: windows per forward pass of each model.
    :param cache: reuse (and fill) the reference's logits across calls.
    """
    if batch_size < 1:
        raise PruneNetError(f"Batch size {batch_size} must be at least 1.")
    start = time.perf_counter()
    total_kl, largest, total_nll, tokens = 0.0, 0.0, 0.0, 0
    for index, batch in enumerate(windows.model_inputs().split(batch_size)):
        key = (windows.task, windows.text_sha256, index * batch_size)
        if cache is not None and key in cache.logits:
            reference_logits = cache.logits[key]
        else:
            reference_logits = reference_model(input_ids=batch.to(model_device(reference_model)))
            reference_logits = reference_logits.logits[:, :-1].float().cpu()
            if cache is not None:
                cache.logits[key] = reference_logits
        logits = model(input_ids=batch.to(model_device(model))).logits
        total_nll += token_nll(logits, batch.to(logits.device)).double().sum().item()
        # The last position predicts past the window's end; perplexity does not score it, and
        # neither does the KL, so both metrics cover the same positions.
        logits = logits[:, :-1].float().cpu()
        if reference_logits.shape != logits.shape:
            raise PruneNetError(
                f"The models disagree on the vocabulary: logits {tuple(reference_logits.shape)} "
                f"vs {tuple(logits.shape)}; compare models that share a tokenizer."
            )
        per_token = per_token_kl(reference_logits, logits)
        total_kl += per_token.sum().item()
        largest = max(largest, per_token.max().item())
        tokens += per_token.numel()
    seconds = time.perf_counter() - start
    kl = KLResult(
        task=windows.task,
        mean_kl=total_kl / tokens,
        max_kl=largest,
        tokens=tokens,
        windows=windows.count,
        seqlen=windows.seqlen,
        bos_token_id=windows.bos_token_id,
        text_sha256=windows.text_sha256,
        seconds=seconds,
    )
    return kl, perplexity_result(windows, total_nll, tokens, seconds)


def per_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference_logits) || softmax(logits)) per position, in float64 nats.

    :param reference_logits: `... x vocab` logits of the reference model.
    :param logits: logits of the compared model, same shape.
    """
    vocab = reference_logits.shape[-1]
    reference_flat = reference_logits.reshape(-1, vocab)
    flat = logits.reshape(-1, vocab)
    pieces = []
    for first in range(0, reference_flat.shape[0], _POSITIONS_PER_CHUNK):
        rows = slice(first, first + _POSITIONS_PER_CHUNK)
        # float64: per-token KLs of mildly pruned models are ~1e-3 nats, a sum over a 49k
        # vocabulary of terms that partly cancel; float32 leaves ~1e-6 of noise per term.
        log_p = torch.log_softmax(reference_flat[rows].double(), dim=-1)
        log_q = torch.log_softmax(flat[rows].double(), dim=-1)
        pieces.append((log_p.exp() * (log_p - log_q)).sum(dim=-1))
    return torch.cat(pieces).reshape(reference_logits.shape[:-1])
