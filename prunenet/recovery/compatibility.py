"""Which teachers a pruned model can be distilled from: those whose tokens mean the same."""

from __future__ import annotations

from prunenet.errors import PruneNetError


def check_same_vocabulary(
    student_config, teacher_config, student_tokenizer=None, teacher_tokenizer=None
) -> None:
    """Refuse a teacher whose tokens mean something else than the student's.

    Depth, width and even architecture may differ (pruning may drop layers and heads, and the
    KL only compares the two models' outputs over the vocabulary), but the i-th logit must be
    the same token in both: equal vocabulary sizes, and equal token -> id maps when both
    folders carry a tokenizer.

    :param student_config: the pruned model's config.
    :param teacher_config: the dense model's config.
    :param student_tokenizer: the pruned model's tokenizer, or None.
    :param teacher_tokenizer: the teacher's tokenizer, or None.
    """
    sizes = [_vocab_size(c) for c in (student_config, teacher_config)]
    if sizes[0] != sizes[1]:
        raise PruneNetError(
            f"The teacher's vocabulary has {sizes[1]} tokens and the model's {sizes[0]}: "
            "distillation compares next-token distributions token by token, so the teacher "
            "must share the model's tokenizer. Pass the dense model this one was pruned from."
        )
    if student_tokenizer is None or teacher_tokenizer is None:
        return
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()))[:3]
        raise PruneNetError(
            f"The teacher's tokenizer maps tokens to other ids than the model's (for example "
            f"{differing}); pass the dense model this one was pruned from."
        )


def _vocab_size(config) -> int | None:
    return getattr(config.get_text_config(), "vocab_size", None)
