"""The scheduler protocol: what the HTTP layer needs from a batching scheduler, and its job types.

A scheduler owns the model on a worker thread. The asyncio side builds a :class:`GenJob` (prompt
ids, one λ, :class:`GenParams`) and ``submit`` s it; the worker sends :class:`GenEvent` s back to
``job.events`` (an ``asyncio.Queue`` filled through ``loop.call_soon_threadsafe``): zero or more
``"delta"`` events, then one ``"done"`` or ``"error"``.

Two implementations: :class:`~rain_adapter.serve.batching.BatchScheduler` (dynamic batching, one
``generate`` call per batch with per-row λ) and
:class:`~rain_adapter.serve.continuous.ContinuousScheduler` (continuous batching with a per-token
λ). :func:`~rain_adapter.serve.scheduler_factory.make_scheduler` picks one by name; ``serve.app`` talks
only to :class:`Scheduler`. This module imports neither implementation (both import it).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

#: the schedulers :func:`~rain_adapter.serve.scheduler_factory.make_scheduler` builds (``rain serve --batching``)
BATCHING_MODES = ("dynamic", "continuous")


@dataclass(frozen=True)
class GenParams:
    """Per-request generation parameters (OpenAI names)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    processing: Any = None   # a ``sampling.LogitsSpec`` (penalties, bias, top_k, min_p, bans, stop ids...) or None
    logprobs: int | None = None  # return the chosen token's logprob and this many top alternatives
    prompt_logprobs: bool = False  # echo + logprobs: the prompt tokens' logprobs (a forward pass)
    # decode-side fields (serve/field_policy.py; they do not change who may share a generate call)
    prompt_top: int = 0            # ``prompt_logprobs`` k: top alternatives per prompt token
    include_stop_str: bool = False  # ``include_stop_str_in_output``: the matched stop string stays in the text
    skip_ids: frozenset[int] | None = None  # ``skip_special_tokens``: ids left out of the text (None: the scheduler's)

    @property
    def plain(self) -> bool:
        """No logits processing and no logprobs (``stop_token_ids`` alone is plain: the row tracker ends
        the row): transformers' continuous batching loop can serve it."""
        return (self.processing is None or not self.processing.logits_active) and self.logprobs is None \
            and not self.prompt_logprobs

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def compat_key(self, job_id: str) -> tuple:
        """Requests with equal keys may share one ``generate`` call.

        Logits processing and logprobs are per row (``row_logits.BatchLogitsProcessor``), so they do not
        split batches: every greedy request shares, sampling requests share by (temperature, top_p)."""
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", job_id)  # a seeded request runs alone: its output must not depend on neighbours
        return ("sample", float(self.temperature), float(self.top_p))


@dataclass
class GenEvent:
    """kind: "delta" (text), "done" (finish_reason, stop_reason, completion_tokens), "error" (message).

    ``stop_reason`` is vLLM's: the stop string or the ``stop_token_ids`` id that ended the row, else None
    (EOS, length, cancel). ``completion_tokens`` counts an ending EOS / stop id, as vLLM does."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    completion_tokens: int = 0
    t: float = 0.0
    error: BaseException | None = None


@dataclass
class GenJob:
    """One request: ``prompt_ids`` (list of token ids), per-row λ, params; events go to ``events``."""

    job_id: str
    prompt_ids: list[int]
    lam: float
    params: GenParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    t_arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    # filled by the worker
    t_first_token: float | None = None
    batch_size: int = 0
    n_generated: int = 0          # tokens produced so far (a cancelled request's row reports them)
    token_logprobs: list = field(default_factory=list)  # per generated token: (id, logprob, [(id, lp)...])
    prompt_logprobs: list | None = None  # echo: per prompt token (id, logprob or None, [(id, lp)...])
    prompt_ranks: list | None = None     # per prompt token: its rank in the vocabulary (1 = most likely; None first)

    def emit(self, ev: GenEvent) -> None:
        """Hand ``ev`` to the job's event loop (callable from any thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, ev)
        except RuntimeError:  # loop closed (shutdown); nothing to deliver to
            pass


@dataclass(frozen=True)
class SchedulerHealth:
    """A scheduler's state for ``/health`` and the Prometheus gauges."""

    queue_depth: int      # jobs submitted and not yet started
    busy: bool            # a generate call (or a continuous batch) is running
    accepting: bool       # started and not stopping: ``submit`` will take jobs
    healthy: bool = True  # the worker(s) can serve requests (False while a loop is dead or restarting)
    reason: str | None = None  # why not healthy


class SchedulerUnavailable(RuntimeError):
    """``submit`` while the scheduler cannot serve (stopping, or a loop restarting): a 503."""


class JobRejected(ValueError):
    """``submit`` of a job the scheduler can never run (e.g. longer than its KV cache): a 400."""


@runtime_checkable
class Scheduler(Protocol):
    """What the server needs from a scheduler. All methods are callable from any thread."""

    def start(self) -> Any:
        """Start the worker(s); idempotent. Jobs submitted before ``start`` wait for it."""

    def submit(self, job: GenJob) -> None:
        """Queue ``job``; raises RuntimeError once :meth:`stop` has begun."""

    def cancel(self, job: GenJob) -> None:
        """The client went away: stop generating for ``job`` soon (it ends with finish_reason "cancelled")."""

    def stop(self, timeout: float | None = 60.0) -> None:
        """Refuse new jobs, finish every queued and running one, then stop the worker(s)."""

    def health(self) -> SchedulerHealth:
        """Queue depth, busy, accepting."""


__all__ = ["BATCHING_MODES", "GenEvent", "GenJob", "GenParams", "JobRejected", "Scheduler", "SchedulerHealth",
           "SchedulerUnavailable"]
