"""One exception type for bad input: its message is a single line that names the fix."""


class HarnessError(RuntimeError):
    """A user-facing error. The entry points print `error: <message>` and exit 2, no traceback."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
