"""Errors of the adapter format: each message names the file, module or field at fault."""


class AdapterError(ValueError):
    """A broken or mismatched adapter; the message names the file or module."""


class AdapterNotFoundError(FileNotFoundError):
    """A name that resolves nowhere; the message lists every place looked at."""
