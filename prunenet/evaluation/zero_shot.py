"""Zero-shot multiple-choice accuracy with lm-eval-harness's definitions and prompts.

lm-eval's multiple-choice scoring. A choice's log-likelihood is the sum of the
  log-probabilities of its continuation tokens given the context (`encode_pair`: trailing spaces
  of the context move to the continuation; the continuation's tokens are those of
  `tok(context + continuation)` after `len(tok(context))`). acc = [argmax loglik == gold];
  acc_norm = [argmax loglik / len(choice text) == gold], where lm-eval's length is the number of
  characters of the choice without the leading delimiter (its docs say bytes; its code uses
  `len(str)`, and we follow the code). Unlike lm-eval's default for non-Gemma models we prepend
  BOS to every context where the tokenizer has one, the same rule as for perplexity (Gemma needs
  it; lm-eval turns it on for Gemma too).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from prunenet.core.devices import model_device
from prunenet.errors import PruneNetError
from prunenet.evaluation.data import ChoiceItem, load_zero_shot, zero_shot_task
from prunenet.evaluation.perplexity import bos_token_id, model_max_length

DEFAULT_ZERO_SHOT_LIMIT = 200  # items per task; 0 or None = the whole split


DEFAULT_BATCH_SIZE = 8  # sequences per forward pass in zero-shot scoring


@dataclass
class ZeroShotResult:
    """Accuracy on one multiple-choice task, on `items` questions chosen with `seed`."""

    task: str
    title: str
    source: str
    prompt: str
    items: int
    items_available: int
    seed: int
    acc: float
    acc_stderr: float
    acc_norm: float | None
    acc_norm_stderr: float | None
    primary_metric: str
    score: float
    scored_tokens: int
    seconds: float

    kind = "zero_shot"

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


def zero_shot_average(results: dict) -> float | None:
    """Mean of the zero-shot scores in `results` (None when no zero-shot task ran)."""
    scores = [r.score for r in results.values() if isinstance(r, ZeroShotResult)]
    return sum(scores) / len(scores) if scores else None


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `encode_pair`: token ids of context and continuation, split the way it does.

    Trailing spaces of the context move to the continuation, and the continuation's tokens are
    taken from the joint tokenization, so a word split differently at the boundary is scored as
    the model would actually see it.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids) :]


def encode_item(tokenizer, item: ChoiceItem, bos_id: int | None) -> list[tuple[list[int], int]]:
    """Per choice: the full token sequence ([BOS] + context + continuation) and how many of its
    final tokens are the continuation."""
    encoded = []
    for context, continuation in zip(item.contexts, item.continuations, strict=True):
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if not continuation_ids:
            raise PruneNetError(f"Choice {continuation!r} tokenizes to nothing.")
        prefix = [bos_id] if bos_id is not None else []
        encoded.append((prefix + context_ids + continuation_ids, len(continuation_ids)))
    return encoded


@torch.inference_mode()
def choice_logliks(
    model: nn.Module,
    encoded: list[list[tuple[list[int], int]]],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
) -> list[list[float]]:
    """Sum of continuation log-probabilities for every choice of every item.

    All choices of all items are sorted by length and batched together (left-padded, with
    explicit position ids, so every row's continuation ends in the last column and only those
    columns go through the LM head via `logits_to_keep`).
    """
    device = model_device(model)
    requests = [
        (item_index, choice_index, tokens, cont_len)
        for item_index, choices in enumerate(encoded)
        for choice_index, (tokens, cont_len) in enumerate(choices)
    ]
    requests.sort(key=lambda r: -len(r[2]))
    logliks: list[list[float]] = [[0.0] * len(choices) for choices in encoded]
    for first in range(0, len(requests), batch_size):
        batch = requests[first : first + batch_size]
        # Inputs drop the last token (nothing to predict after it); lm-eval cuts long inputs
        # on the left to the model's maximum length.
        inputs = [tokens[:-1] for _, _, tokens, _ in batch]
        if max_length is not None:
            inputs = [ids[-max_length:] for ids in inputs]
        width = max(len(ids) for ids in inputs)
        keep = max(cont_len for *_, cont_len in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, ids in enumerate(inputs):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=keep,
        ).logits.float()
        log_probs = torch.log_softmax(logits, dim=-1).cpu()
        for row, (item_index, choice_index, tokens, cont_len) in enumerate(batch):
            targets = torch.tensor(tokens[-cont_len:])
            rows = log_probs[row, keep - cont_len :]
            value = rows.gather(-1, targets.unsqueeze(-1)).sum().item()
            logliks[item_index][choice_index] = value
    return logliks


def item_correct(item: ChoiceItem, logliks: Sequence[float]) -> tuple[bool, bool]:
    """(acc, acc_norm) of one item: argmax of log-likelihood, and of loglik / choice length.

    Ties go to the first choice, like numpy's argmax in lm-eval.
    """
    pred = max(range(len(logliks)), key=lambda i: (logliks[i], -i))
    normed = [ll / length for ll, length in zip(logliks, item.norm_lengths, strict=True)]
    pred_norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
    return pred == item.gold, pred_norm == item.gold


def zero_shot(
    model: nn.Module,
    task: str,
    items: list[ChoiceItem],
    encoded: list[list[tuple[list[int], int]]],
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
) -> ZeroShotResult:
    """acc (and acc_norm where the task defines it) of `model` on prepared `items`."""
    start = time.perf_counter()
    info = zero_shot_task(task)
    logliks = choice_logliks(model, encoded, batch_size, max_length)
    outcomes = [item_correct(item, ll) for item, ll in zip(items, logliks, strict=True)]
    acc = _mean([a for a, _ in outcomes])
    has_norm = "acc_norm" in info.metrics
    acc_norm = _mean([n for _, n in outcomes]) if has_norm else None
    return ZeroShotResult(
        task=task,
        title=info.title,
        source=info.source,
        prompt=info.prompt,
        items=len(items),
        items_available=len(info.read()),
        seed=seed,
        acc=acc,
        acc_stderr=_stderr(acc, len(items)),
        acc_norm=acc_norm,
        acc_norm_stderr=_stderr(acc_norm, len(items)) if acc_norm is not None else None,
        primary_metric=info.primary_metric,
        score=acc_norm if has_norm else acc,
        scored_tokens=sum(c for choices in encoded for _, c in choices),
        seconds=time.perf_counter() - start,
    )


def evaluate_zero_shot(
    model: nn.Module,
    tokenizer,
    task: str,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ZeroShotResult:
    """Convenience: load, sample, tokenize and score one zero-shot task."""
    items = load_zero_shot(task, limit, seed)
    bos_id = bos_token_id(tokenizer)
    encoded = [encode_item(tokenizer, item, bos_id) for item in items]
    return zero_shot(model, task, items, encoded, seed, batch_size, model_max_length(model))


def _mean(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
