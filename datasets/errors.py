"""The error a user's data can cause: one line to print, saying what to do."""


class DataError(Exception):
    """Missing or malformed data: the message is one line that says what to do."""
