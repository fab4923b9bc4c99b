"""One exception type for every user-facing failure, so the CLI can print it without a traceback."""


class PropdError(Exception):
    """A problem with the user's input or environment, explained in the message."""
