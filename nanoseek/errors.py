"""User-facing errors.

Anything a user can cause (a bad flag, a missing file, a malformed checkpoint) raises `NanoseekError` with a
one-line message that names what was wrong and where. The CLI prints it as `error: ...` and exits with code 2,
without a traceback; everything else is a bug and keeps its traceback.
"""


class NanoseekError(Exception):
    """A problem with the user's input, reported as one line. `echo=True` marks a rank's error that only repeats
    what rank 0 reports (under torchrun): the CLI does not print it again."""

    def __init__(self, message: str = "", echo: bool = False):
        super().__init__(message)
        self.echo = echo
