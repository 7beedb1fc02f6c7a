"""An evaluation suite: tasks prepared once, run on many models, with their protocol.

Every metric is defined in `METRIC_DEFINITIONS` and the settings go into the protocol with every
result, because sequence length, BOS handling, lm-eval version and acc vs acc_norm are what
usually make two "perplexities" or "accuracies" incomparable.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from prunenet.errors import PruneNetError
from prunenet.evaluation.data import PERPLEXITY_TEXTS, code_files_found
from prunenet.evaluation.divergence import (
    DEFINITION as KL_DEFINITION,
)
from prunenet.evaluation.divergence import (
    KLResult,
    ReferenceCache,
    kl_and_perplexity,
)
from prunenet.evaluation.perplexity import (
    DEFAULT_PPL_WINDOWS,
    DEFAULT_SEQLEN,
    PPL_TASKS,
    PerplexityResult,
    TokenWindows,
    bos_token_id,
    perplexity,
    text_windows,
)
from prunenet.evaluation.zero_shot import (
    DEFAULT_ZERO_SHOT_BATCH,
    DEFAULT_ZERO_SHOT_LIMIT,
    LOCAL_TASKS,
    PAPER_TASKS,
    check_tasks,
    evaluate_zero_shot,
)

DEFAULT_TASKS: tuple[str, ...] = (*PPL_TASKS, *PAPER_TASKS)

METRIC_DEFINITIONS: dict[str, str] = {
    "perplexity": (
        "exp(total NLL / scored tokens) over non-overlapping windows of seqlen text tokens, "
        "evenly spaced through the text; each window is fed as [BOS] + window when the "
        "tokenizer has a BOS (all seqlen tokens scored), else bare (first token not scored)"
    ),
    "kl": KL_DEFINITION,
    "acc": "lm-evaluation-harness multiple-choice acc (argmax of summed log-likelihood)",
    "acc_norm": "lm-evaluation-harness acc_norm (log-likelihood / choice length in characters)",
    "zero_shot_selection": "the first `limit` documents of each task's split, in file order",
    "zero_shot_bos": "lm-eval's default: contexts encoded as the tokenizer does by default",
    "score": "acc_norm where lm-eval reports it for the task, else acc (SliceGPT/PruneNet rule)",
    "zero_shot_average": "unweighted mean of the task scores; stderr = sqrt(sum stderr^2) / n",
    "stderr": "lm-eval's stderr: sample standard deviation / sqrt(n)",
    "speed": (
        "prefill: batch 1 x prefill_tokens random ids, one forward; decode: greedy generate of "
        "exactly max_new_tokens after a random prompt, tokens/s = batch x new tokens / call "
        "time; dense and pruned alternated per round (ABBA...), median and range over rounds, "
        "speed-up = median(model) / median(reference)"
    ),
    "params_total": "unique parameters (tied embeddings counted once)",
    "params_ffn": "parameters of every layer's FFN input and output projections (with biases)",
}


def parse_tasks(text: str) -> tuple[list[str], list[str]]:
    """'ppl_boolq,piqa' -> (perplexity texts, zero-shot tasks), each in order, no duplicates.

    Zero-shot names other than the local ones are checked against lm-eval's task index, so a
    typo exits before any model is loaded.

    :param text: comma-separated task names.
    """
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise PruneNetError(f"No task given. Choose from: {all_task_names()}.")
    zero_shot = [name for name in names if name not in PERPLEXITY_TEXTS]
    if any(name.startswith("ppl_") for name in zero_shot):
        unknown = [name for name in zero_shot if name.startswith("ppl_")]
        raise PruneNetError(
            f"Unknown perplexity text {', '.join(map(repr, unknown))}. Choose from: "
            f"{all_task_names()}."
        )
    check_tasks(zero_shot)
    return [name for name in names if name in PERPLEXITY_TEXTS], zero_shot


def all_task_names() -> str:
    """The built-in task names, comma-separated, for error messages and `--help`."""
    return ", ".join([*PERPLEXITY_TEXTS, *LOCAL_TASKS]) + " (or any lm-eval task name)"


@dataclass
class SuiteResult:
    """One model's results: perplexity per text, KL per text (with a reference), zero-shot.

    :param perplexity: text name -> result.
    :param kl: text name -> KL(reference || model) (empty without a reference).
    :param zero_shot: `evaluate_zero_shot`'s record (None without zero-shot tasks).
    """

    perplexity: dict[str, PerplexityResult] = field(default_factory=dict)
    kl: dict[str, KLResult] = field(default_factory=dict)
    zero_shot: dict[str, Any] | None = None

    def to_dict(self) -> dict:
        return {
            "perplexity": {k: v.to_dict() for k, v in self.perplexity.items()},
            "kl": {k: v.to_dict() for k, v in self.kl.items()},
            "zero_shot": self.zero_shot,
        }


class EvaluationSuite:
    """Tasks prepared once (texts tokenized into windows), run on many models.

    :param tokenizer: the models' tokenizer.
    :param ppl_tasks: perplexity texts (`PPL_TASKS`).
    :param zero_shot_tasks: lm-eval task names (local ones or any lm-eval task).
    :param seqlen: perplexity window length in tokens.
    :param ppl_windows: windows per perplexity text (None or 0: every window of the text).
    :param limit: first N documents per zero-shot task (None or 0: the whole split).
    :param batch_size: perplexity windows per forward pass.
    :param zero_shot_batch_size: lm-eval requests per forward pass.
    :param cache_reference: keep the reference's logits between `run` calls (the benchmark
        compares many models with one dense model; costs windows x seqlen x vocab x 4 bytes).
    """

    def __init__(
        self,
        tokenizer,
        ppl_tasks: Sequence[str] = PPL_TASKS,
        zero_shot_tasks: Sequence[str] = PAPER_TASKS,
        seqlen: int = DEFAULT_SEQLEN,
        ppl_windows: int | None = DEFAULT_PPL_WINDOWS,
        limit: int | None = DEFAULT_ZERO_SHOT_LIMIT,
        batch_size: int = 1,
        zero_shot_batch_size: int = DEFAULT_ZERO_SHOT_BATCH,
        cache_reference: bool = False,
    ) -> None:
        if batch_size < 1 or zero_shot_batch_size < 1:
            raise PruneNetError("Batch sizes must be at least 1.")
        self.tokenizer = tokenizer
        self.ppl_tasks = list(ppl_tasks)
        self.zero_shot_tasks = list(zero_shot_tasks)
        self.seqlen = seqlen
        self.ppl_windows = ppl_windows or None
        self.limit = limit or None
        self.batch_size = batch_size
        self.zero_shot_batch_size = zero_shot_batch_size
        self.cache = ReferenceCache() if cache_reference else None
        self.windows: dict[str, TokenWindows] = {
            task: text_windows(tokenizer, task, seqlen, self.ppl_windows) for task in ppl_tasks
        }

    def run(
        self,
        model: nn.Module,
        reference: nn.Module | None = None,
        progress: Callable[[str, str], None] | None = None,
    ) -> SuiteResult:
        """Every task on `model`; KL to `reference` on the perplexity windows when given.

        :param model: the evaluated model.
        :param reference: the dense model it came from (None: no KL).
        :param progress: called with (task, one-line summary) after each task.
        """
        result = SuiteResult()
        for task, windows in self.windows.items():
            if reference is None:
                ppl = perplexity(model, windows, self.batch_size)
                line = f"perplexity {ppl.perplexity:.3f} on {ppl.scored_tokens:,}"
            else:
                kl, ppl = kl_and_perplexity(reference, model, windows, self.batch_size, self.cache)
                result.kl[task] = kl
                line = f"perplexity {ppl.perplexity:.3f}, KL {kl.mean_kl:.4f} on {kl.tokens:,}"
            result.perplexity[task] = ppl
            if progress is not None:
                progress(task, f"{line} tokens ({ppl.seconds:.1f} s)")
        if self.zero_shot_tasks:
            result.zero_shot = evaluate_zero_shot(
                model, self.tokenizer, self.zero_shot_tasks, self.limit, self.zero_shot_batch_size
            )
            if progress is not None:
                progress("zero-shot", f"{len(self.zero_shot_tasks)} task(s) through lm-eval "
                         f"({result.zero_shot['seconds']:.1f} s)")  # fmt: skip
        return result

    def protocol(self) -> dict:
        """The settings that define these numbers, for the JSON record."""
        bos = bos_token_id(self.tokenizer)
        found, missing = code_files_found()
        return {
            "ppl_tasks": self.ppl_tasks,
            "zero_shot_tasks": self.zero_shot_tasks,
            "seqlen": self.seqlen,
            "ppl_windows": self.ppl_windows,
            "ppl_texts": {
                task: {
                    "source": PERPLEXITY_TEXTS[task].source,
                    "sha256": windows.text_sha256,
                    "corpus_tokens": windows.corpus_tokens,
                    "windows_available": windows.windows_available,
                }
                for task, windows in self.windows.items()
            },
            "ppl_code_files": {"read": len(found), "missing": missing},
            "ppl_bos_token": self.tokenizer.convert_ids_to_tokens(bos) if bos is not None else None,
            "zero_shot_limit": self.limit,
            "zero_shot_selection": METRIC_DEFINITIONS["zero_shot_selection"],
            "batch_size": self.batch_size,
            "zero_shot_batch_size": self.zero_shot_batch_size,
            "lm_eval_version": lm_eval_version(),
        }


def lm_eval_version() -> str | None:
    """The installed lm-evaluation-harness version (None when it is missing)."""
    try:
        return importlib.metadata.version("lm-eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def software_versions() -> dict[str, str | None]:
    """Python, torch, transformers, lm-eval and PruneNet versions, for every record of numbers."""
    import platform

    import torch
    import transformers

    from prunenet import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "lm_eval": lm_eval_version(),
            "prunenet": __version__}  # fmt: skip
