"""Errors raised for bad data on disk."""


class DataError(ValueError):
    """A file is missing, corrupt or not what the layout promises; the message names the
    file (or field) and what was expected."""
