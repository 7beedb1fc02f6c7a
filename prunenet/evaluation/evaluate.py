"""Perplexity, zero-shot accuracy, parameter counts and speed: the numbers users compare.

Why not lm-evaluation-harness itself: its tasks load datasets through `datasets.load_dataset`
from the hub, which is unreachable here, and its pinned dependencies clash with ours. So we
implement its definitions and prompt formats (see `prunenet.evaluation.data`) and record the protocol with
every result, because sequence length, BOS handling and acc vs acc_norm are what usually make
two "perplexities" or "accuracies" incomparable:

- **Perplexity**: the corpus is tokenized once (no special tokens) and cut into consecutive,
  non-overlapping windows of `seqlen` tokens. Each window is fed as `[BOS] + window` where the
  tokenizer has a BOS (so every one of its `seqlen` tokens is predicted), else as the bare window
  (its first token has no context and is not scored). Perplexity = exp(total NLL / scored
  tokens). A window limit picks windows evenly spaced through the corpus, so a small limit still
  samples all of it rather than only its first documents.
- **Zero-shot**: lm-eval's multiple-choice scoring. A choice's log-likelihood is the sum of the
  log-probabilities of its continuation tokens given the context (`encode_pair`: trailing spaces
  of the context move to the continuation; the continuation's tokens are those of
  `tok(context + continuation)` after `len(tok(context))`). acc = [argmax loglik == gold];
  acc_norm = [argmax loglik / len(choice text) == gold], where lm-eval's length is the number of
  characters of the choice without the leading delimiter (its docs say bytes; its code uses
  `len(str)`, and we follow the code). Unlike lm-eval's default for non-Gemma models we prepend
  BOS to every context where the tokenizer has one, the same rule as for perplexity (Gemma needs
  it; lm-eval turns it on for Gemma too).
- **Speed**: forward passes over random tokens at a fixed batch and length, median latency over
  repeats after warm-up; tokens/s = batch x length / median latency. The full LM head runs.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prunenet.core.arch import adapter_for, decoder_layers, ffn_modules
from prunenet.core.compress import count_parameters
from prunenet.errors import PruneNetError
from prunenet.evaluation.data import (
    PERPLEXITY_TEXTS,
    ChoiceItem,
    load_text,
    load_zero_shot,
    zero_shot_task,
)

DEFAULT_SEQLEN = 512
DEFAULT_PPL_WINDOWS = 16  # 16 x 512 = 8192 tokens per text: ~30 s per text for SmolLM2 on 1 CPU
DEFAULT_ZERO_SHOT_LIMIT = 200  # items per task; 0 or None = the whole split
DEFAULT_BATCH_SIZE = 8  # sequences per forward pass in zero-shot scoring
DEFAULT_SPEED_BATCH = 1
DEFAULT_SPEED_SEQLEN = 256
DEFAULT_SPEED_REPEATS = 5

METRIC_DEFINITIONS: dict[str, str] = {
    "perplexity": (
        "exp(total NLL / scored tokens) over consecutive non-overlapping windows of seqlen "
        "text tokens; each window is fed as [BOS] + window when the tokenizer has a BOS (all "
        "seqlen tokens scored), else bare (first token not scored); a window limit takes "
        "windows evenly spaced through the corpus"
    ),
    "acc": (
        "lm-eval multiple choice: 1 if argmax_i sum log p(continuation_i | context_i) is the "
        "gold choice; BOS prepended to the context when the tokenizer has one"
    ),
    "acc_norm": (
        "lm-eval multiple choice: 1 if argmax_i loglik_i / len(choice_i) is the gold choice, "
        "len = characters of the choice text without the leading space (lm-eval's code)"
    ),
    "score": "acc_norm where lm-eval defines it for the task, else acc (SliceGPT/PruneNet rule)",
    "zero_shot_average": "unweighted mean of the per-task scores of the zero-shot tasks run",
    "stderr": "sqrt(p (1 - p) / (n - 1)), the sample standard error lm-eval reports",
    "tokens_per_second": (
        "batch x length / median latency of a forward pass over random token ids "
        "(full LM head), after warm-up, on the evaluation device and thread count"
    ),
    "params_total": "unique parameters (tied embeddings counted once)",
    "params_ffn": "parameters of every layer's FFN input and output projections (with biases)",
}


# --------------------------------------------------------------------------- results


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


# --------------------------------------------------------------------------- suite


class EvaluationSuite:
    """Tasks prepared once (texts tokenized, items sampled and tokenized), run on many models.

    The quality benchmark evaluates dozens of pruned copies of one model; they share the
    tokenizer, so tokenizing the corpora and the questions once saves minutes.

    :param tokenizer: the models' tokenizer.
    :param tasks: task names from `prunenet.evaluation.data` (`ppl_*` perplexity texts, zero-shot tasks).
    :param seqlen: perplexity window length in tokens.
    :param ppl_windows: windows per perplexity text (None or 0: every window of the corpus).
    :param limit: items per zero-shot task (None or 0: the whole split).
    :param seed: seed of the zero-shot item sample.
    :param batch_size: sequences per forward pass (zero-shot choices; perplexity windows).
    :param max_length: longest sequence a model sees; longer zero-shot inputs are cut on the left
        (lm-eval's rule). None: taken from the first model's config.
    """

    def __init__(
        self,
        tokenizer,
        tasks: Sequence[str],
        seqlen: int = DEFAULT_SEQLEN,
        ppl_windows: int | None = DEFAULT_PPL_WINDOWS,
        limit: int | None = DEFAULT_ZERO_SHOT_LIMIT,
        seed: int = 0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
    ) -> None:
        if seqlen < 2:
            raise PruneNetError(f"--seqlen {seqlen} is too short; use at least 2 tokens.")
        if batch_size < 1:
            raise PruneNetError(f"Batch size {batch_size} must be at least 1.")
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.seqlen = seqlen
        self.ppl_windows = ppl_windows or None
        self.limit = limit or None
        self.seed = seed
        self.batch_size = batch_size
        self.max_length = max_length
        self.bos_id = bos_token_id(tokenizer)
        self._windows: dict[str, TokenWindows] = {}
        self._requests: dict[str, list[ChoiceItem]] = {}
        self._encoded: dict[str, list[list[tuple[list[int], int]]]] = {}
        for task in self.tasks:
            if task in PERPLEXITY_TEXTS:
                self._windows[task] = token_windows(
                    tokenizer, load_text(task), seqlen, self.ppl_windows
                )
            else:
                items = load_zero_shot(task, self.limit, seed)
                self._requests[task] = items
                self._encoded[task] = [encode_item(tokenizer, item, self.bos_id) for item in items]

    def run(self, model: nn.Module, progress=None) -> dict[str, PerplexityResult | ZeroShotResult]:
        """Every task on `model`; `progress(task, result)` is called after each one."""
        max_length = self.max_length or model_max_length(model)
        results: dict[str, PerplexityResult | ZeroShotResult] = {}
        for task in self.tasks:
            if task in self._windows:
                result = perplexity(
                    model, self._windows[task], self.bos_id, self.batch_size, task=task
                )
            else:
                result = zero_shot(
                    model,
                    task,
                    self._requests[task],
                    self._encoded[task],
                    seed=self.seed,
                    batch_size=self.batch_size,
                    max_length=max_length,
                )
            results[task] = result
            if progress is not None:
                progress(task, result)
        return results

    def protocol(self) -> dict:
        """The settings that define these numbers, for the JSON record."""
        return {
            "tasks": self.tasks,
            "seqlen": self.seqlen,
            "ppl_windows": self.ppl_windows,
            "zero_shot_limit": self.limit,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "bos_token": self.tokenizer.convert_ids_to_tokens(self.bos_id)
            if self.bos_id is not None
            else None,
            "max_length": self.max_length,
        }


def zero_shot_average(results: dict) -> float | None:
    """Mean of the zero-shot scores in `results` (None when no zero-shot task ran)."""
    scores = [r.score for r in results.values() if isinstance(r, ZeroShotResult)]
    return sum(scores) / len(scores) if scores else None


# --------------------------------------------------------------------------- perplexity


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


# --------------------------------------------------------------------------- zero-shot


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


# --------------------------------------------------------------------------- size and speed


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Total parameters and those of the FFNs (found through `prunenet.core.arch`)."""
    adapter = adapter_for(model.config)
    ffn = 0
    widths = []
    for layer in decoder_layers(model):
        inputs, output = ffn_modules(layer, adapter)
        ffn += sum(p.numel() for module in [*inputs, output] for p in module.parameters())
        weight = output.weight
        widths.append(int(weight.shape[0] if adapter.layout == "conv1d" else weight.shape[1]))
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
        _synchronize(device)
        start = time.perf_counter()
        model(input_ids=input_ids)
        _synchronize(device)
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


# --------------------------------------------------------------------------- helpers


def bos_token_id(tokenizer) -> int | None:
    """The tokenizer's BOS id, or None when it has none (then nothing is prepended)."""
    return getattr(tokenizer, "bos_token_id", None)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_max_length(model: nn.Module) -> int:
    """Longest input the model's positions allow (lm-eval's fallback is 2048)."""
    config = model.config
    config = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def default_device() -> str:
    """The accelerator when there is one, else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def describe_device(device: torch.device | str) -> str:
    """'cpu (x86_64, 2 logical cores)' or the GPU's name: what a timing was measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.machine()}, {os.cpu_count()} logical cores)"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
