"""Picking a scheduler by name: :func:`make_scheduler` for ``rain serve --batching``.

Kept out of :mod:`~rain_adapter.serve.scheduler` (the protocol and job types), which both
implementations import: this module imports them, so nothing imports back.
"""

from __future__ import annotations

from collections.abc import Callable

from .batching import BatchScheduler
from .continuous import ContinuousScheduler
from .scheduler import BATCHING_MODES, Scheduler

_CLASSES = dict(zip(BATCHING_MODES, (BatchScheduler, ContinuousScheduler)))


def make_scheduler(batching: str, model, tokenizer, *, max_batch_size: int, batch_window_ms: float,
                   on_batch: Callable[[int, float], None] | None = None) -> Scheduler:
    """A new (not yet started) scheduler for ``batching`` = "dynamic" or "continuous"."""
    if batching not in _CLASSES:
        raise ValueError(f"rain_adapter.serve: batching must be 'dynamic' or 'continuous', got {batching!r}")
    return _CLASSES[batching](model, tokenizer, max_batch_size=max_batch_size, batch_window_ms=batch_window_ms,
                              on_batch=on_batch)


__all__ = ["make_scheduler"]
