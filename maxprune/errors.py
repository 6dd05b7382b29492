"""The error classes the CLI turns into one line and an exit status.

Anything a user can get wrong (a config key, a path, a shape, a range) raises
`MaxpruneError` with a one-line message naming the bad value and what would be
valid. The CLI prints the message and exits with status 2, no traceback.
Two outcomes of training that are not mistakes have their own statuses:
`Diverged` (3) and `Stopped` (128 + the signal, after a checkpoint was saved).
"""


class MaxpruneError(Exception):
    """A user-facing error: bad input, not a bug."""

    exit_code = 2
    label = "error"


class Diverged(MaxpruneError):
    """A non-finite loss or gradient; the last good checkpoint is kept."""

    exit_code = 3


class Stopped(MaxpruneError):
    """SIGTERM/SIGINT asked training to stop; a checkpoint was saved to resume from."""

    label = "stopped"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
