"""The one error class for user mistakes.

Anything a user can get wrong (a config key, a path, a shape, a range) raises
`MaxpruneError` with a one-line message naming the bad value and what would be
valid. The CLI prints the message and exits with status 2, no traceback.
"""


class MaxpruneError(Exception):
    """A user-facing error: bad input, not a bug."""

    exit_code = 2
