"""The library's own error type: a clear message for a user mistake, never a deep traceback."""


class SelfmaskError(ValueError):
    """Bad input (a file, key, value or option), with a message naming the problem."""
