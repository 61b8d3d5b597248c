"""The build's error and warning classes (docs/DESIGN.md §5).

:class:`BuildError` is the one error a build that cannot proceed raises: every input check of the
build (options, calibration files, tokenizer, checkpoints, the triple's configs, Hub fetches)
raises it or a subclass (``calibration.CalibrationError``, ``spans.SpanError``,
``taskvector.CheckpointError``, :class:`HubFetchError`), so a caller can catch one class and
``rain build`` prints one line. It is a ``ValueError``, so callers that catch that keep working.

:class:`BuildWarning` and its subclasses are what a build that succeeds still wants a person to
read (``report.BuildLog.warn`` prints them even with ``--no-verbose`` and records them).
"""

from __future__ import annotations


class BuildError(ValueError):
    """A build that cannot proceed; the message says which input is wrong, ``field`` names the
    BuildOptions field when the error is about one option or input."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class HubFetchError(BuildError):
    """A Hub id (tokenizer, config or checkpoint) could not be fetched (offline, no such repo,
    gated, no network); the message names the repo id and how to pass a local directory instead."""


class BuildWarning(UserWarning):
    """Something a finished build wants a person to read."""


class KeptNormWarning(BuildWarning):
    """Stage 1 removed (almost) all of the task vector: the adapter is close to empty."""


class ConfigMismatchWarning(BuildWarning):
    """The LRM, ITM and base configs differ in a field that does not change module shapes
    (``rope_theta``, ``vocab_size``, ...)."""
