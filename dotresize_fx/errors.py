"""One error type for everything the toolkit refuses, so the CLI can print it as one line."""


class DotResizeError(Exception):
    """A failure the user can act on: the message says what failed, why, and what to do."""
