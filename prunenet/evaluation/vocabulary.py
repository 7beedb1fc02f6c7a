"""Does a tokenizer fit a model? A token id at or beyond the embedding's rows has no vector:
the forward pass fails with an IndexError (a device-side assert on CUDA) at the first text that
uses it. `prunenet eval` refuses such a pair up front; `prunenet prune` warns, because it reads
no text with the tokenizer (it only saves it), but the folder it writes will not evaluate.
"""

from __future__ import annotations

import sys

from torch import nn


def token_id_count(tokenizer) -> int:
    """How many ids the tokenizer can produce: its largest id + 1 (added tokens included; ids
    may have holes, so this is not `len(tokenizer)`).

    :param tokenizer: a transformers tokenizer.
    """
    ids = tokenizer.get_vocab().values()
    return max(ids) + 1 if ids else 0


def embedding_rows(model: nn.Module) -> int:
    """Rows of the model's input embedding: the ids it can read.

    :param model: a transformers model.
    """
    return model.get_input_embeddings().num_embeddings


def tokenizer_overflow(tokenizer, rows: int) -> str | None:
    """Why `tokenizer` does not fit an embedding of `rows` rows (None when it does), naming
    both sizes.

    :param tokenizer: a transformers tokenizer.
    :param rows: the model's embedding rows (`embedding_rows`, or the config's vocab_size).
    """
    count = token_id_count(tokenizer)
    if count <= rows:
        return None
    return (
        f"its tokenizer has token ids up to {count - 1:,} ({count:,} ids), but the model's "
        f"embedding has {rows:,} rows (ids 0 to {rows - 1:,}), so text with the other "
        f"{count - rows:,} tokens cannot be run through it"
    )


def warn_if_tokenizer_overflows(tokenizer, rows: int, spec: str) -> None:
    """`prunenet prune`: say on stderr that the folder it writes will not evaluate, when the
    tokenizer it saves there has ids the model lacks (pruning itself reads no text with it).

    :param tokenizer: the tokenizer saved beside the pruned model (None: the folder gets none).
    :param rows: the model's embedding rows (or its config's vocab_size).
    :param spec: the model as the user named it.
    """
    problem = None if tokenizer is None else tokenizer_overflow(tokenizer, rows)
    if problem:
        print(
            f"prunenet prune: warning: model {spec}: {problem}. The folder is written as asked, "
            "but `prunenet eval` will refuse it; give it the tokenizer of the model it comes from.",
            file=sys.stderr,
        )
