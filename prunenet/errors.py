"""The one exception type users see.

Every failure caused by the user's input (a bad ratio, an unsupported model, a missing
checkpoint, ...) raises `PruneNetError` with a message that says what was wrong and what to
do; the CLI prints it without a traceback. Anything else is a bug and keeps its traceback.
"""


class PruneNetError(ValueError):
    """A problem with the user's input, explained in the message."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C (the CLI installs the handler) so every cleanup runs."""


def clip(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters for a message: a message quotes what the user gave (a
    list of 10,000 values, a file's strings), never all of it.

    :param text: what to quote.
    :param limit: the most characters shown, "..." included.
    """
    return text if len(text) <= limit else text[: limit - 3] + "..."
