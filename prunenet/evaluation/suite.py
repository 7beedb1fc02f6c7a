"""An evaluation suite: tasks prepared once for a tokenizer, then run on many models.

The numbers themselves come from `perplexity`, `zero_shot` and `speed`; this module strings them
together for `prunenet eval` and the quality benchmark, and records the protocol with every
result, because sequence length, BOS handling and acc vs acc_norm are what usually make two
"perplexities" or "accuracies" incomparable.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from prunenet.errors import PruneNetError
from prunenet.evaluation.data import (
    PERPLEXITY_TEXTS,
    ChoiceItem,
    load_text,
    load_zero_shot,
)
from prunenet.evaluation.perplexity import (
    DEFAULT_PPL_WINDOWS,
    DEFAULT_SEQLEN,
    PerplexityResult,
    TokenWindows,
    bos_token_id,
    model_max_length,
    perplexity,
    token_windows,
)
from prunenet.evaluation.zero_shot import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_ZERO_SHOT_LIMIT,
    ZeroShotResult,
    encode_item,
    zero_shot,
)

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
