"""The error type of the pack's nodes."""


class HyperSDError(RuntimeError):
    """An error meant for the artist: one sentence that says what is wrong and what to do."""
