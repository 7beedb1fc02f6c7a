"""The one exception type users see.

Every failure caused by the user's input (a bad ratio, an unsupported model, a missing
checkpoint, ...) raises `PruneNetError` with a message that says what was wrong and what to
do; the CLI prints it without a traceback. Anything else is a bug and keeps its traceback.
"""


class PruneNetError(ValueError):
    """A problem with the user's input, explained in the message."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C (the CLI installs the handler) so every cleanup runs."""
