"""The request log's rows and the metrics that follow them.

Every request that passed the API key check gets one row, whatever happened to it:

* ``ok`` — answered; scored with :func:`~rain_adapter.serve.scoring.score_output` (a check that
  cannot run is *unscored*, counted in ``unscored`` and ``rain_checks_unscored_total``);
* ``error`` — generation failed (a 500), ``reason`` names the failure;
* ``cancelled`` — the client went away; ``completion_tokens`` are the tokens produced until then;
* ``rejected`` — a 4xx before generation (``http_status`` and ``reason``: the error message).

Rows are written in a worker thread (SQLite and the scoring are CPU work, kept off the event loop);
``commit`` returns once the row is durable. The one exception is :meth:`RequestLog.write_quietly`, which
writes on the calling thread: a streaming response's ``finally`` uses it on the event loop when its
task is cancelled mid-stream, where an ``await`` would not complete. ``on_row`` callbacks (the Thompson
policy) see each committed row. With a :class:`~rain_adapter.serve.rewards.RewardGate` (an adaptive
arm policy), an ``ok`` row also records what it gives the policy (``reward``, ``reward_note``),
decided before the row is written.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from .errors import APIError
from .limits import MAX_REASON_CHARS, MAX_USER_CHARS
from .metrics_db import MetricsDB
from .prom import ServeMetrics
from .rewards import RewardGate
from .scheduler import GenEvent
from .scoring import score_output

log = logging.getLogger("rain_adapter.serve")


class RequestLog:
    """Writes request rows and feedback to the :class:`MetricsDB` and keeps the metrics in step."""

    def __init__(self, db: MetricsDB, metrics: ServeMetrics, rewards: RewardGate | None = None):
        self.db = db
        self.metrics = metrics
        self.rewards = rewards
        self.on_row: list[Callable[[dict[str, Any]], None]] = []

    def row(self, ex, text: str, done: GenEvent | None, status: str, reason: str | None = None,
            http_status: int | None = None) -> dict[str, Any]:
        """The log row of an exchange that ended ``ok``, ``error`` or ``cancelled`` (see the module doc)."""
        job = ex.job
        score = score_output(text, ex.request.rain.checks) if status == "ok" else None
        ttft = (job.t_first_token - job.t_arrival) if job.t_first_token is not None else None
        row = dict(id=ex.rid, endpoint=ex.endpoint, model=ex.model_name, user=ex.request.user, arm=ex.arm,
                   lam=ex.lam, assignment=ex.assignment, stream=ex.request.stream, prompt_tokens=ex.prompt_tokens,
                   completion_tokens=done.completion_tokens if done else job.n_generated,
                   latency_s=time.perf_counter() - job.t_arrival, ttft_s=ttft,
                   finish_reason=done.finish_reason if done else None,
                   format_valid=score.format_valid if score else None, compliant=score.compliant if score else None,
                   checks_json=(score.results or None) if score else None, batch_size=job.batch_size,
                   status=status, reason=(reason or "")[:MAX_REASON_CHARS] or None,
                   http_status=http_status or (200 if status == "ok" else None),
                   unscored=score.unscored if score else None, n_choices=getattr(ex, "n_choices", 1),
                   choice_index=getattr(ex, "index", 0), client=getattr(ex, "client", None))
        if self.rewards is not None and status == "ok":
            row.update(self.rewards.judge(row, text))
        return row

    async def finish(self, ex, text: str, done: GenEvent | None, status: str, reason: str | None = None,
                     http_status: int | None = None) -> dict[str, Any]:
        """Build (scoring in a thread) and commit the row; returns it."""
        row = await asyncio.to_thread(self.row, ex, text, done, status, reason, http_status)
        await self.commit(row)
        return row

    async def commit(self, row: dict[str, Any]) -> None:
        """Write ``row`` (committed when this returns), then count it in the metrics."""
        await asyncio.to_thread(self.write, row)

    def write(self, row: dict[str, Any]) -> None:
        """Write ``row`` and update the metrics (blocking)."""
        self.db.log_request(row)
        m = self.metrics
        arm = row.get("arm") or "-"
        with m.registry.lock:
            m.requests.inc(row["endpoint"], arm, row["status"])
            if row.get("unscored"):
                m.unscored.inc(arm, by=row["unscored"])
            if row["status"] == "ok":
                m.prompt_tokens.inc(arm, by=row["prompt_tokens"])
                m.completion_tokens.inc(arm, by=row["completion_tokens"])
                m.latency.observe(row["latency_s"], arm)
                if row["ttft_s"] is not None:
                    m.ttft.observe(row["ttft_s"], arm)
        for fn in self.on_row:
            try:
                fn(row)
            except Exception:  # noqa: BLE001 - a policy update must not fail a logged request
                log.exception("rain serve: a request-log listener failed")

    def write_quietly(self, row: dict[str, Any]) -> None:
        """:meth:`write` from a generator's ``finally`` (no await): errors are logged, not raised."""
        try:
            self.write(row)
        except Exception:  # noqa: BLE001
            log.exception("rain serve: could not log request %s", row.get("id"))

    async def rejected(self, endpoint: str, model: str, body: Any, e: APIError, t0: float) -> None:
        """Log a request refused with a 4xx (after the API key check) before generation."""
        user = body.get("user") if isinstance(body, dict) else None
        row = dict(id=f"rej-{uuid.uuid4().hex}", endpoint=endpoint, model=model,
                   user=user[:MAX_USER_CHARS] if isinstance(user, str) else None, arm=None, lam=None,
                   assignment=None, stream=None, prompt_tokens=None, completion_tokens=0,
                   latency_s=time.perf_counter() - t0, ttft_s=None, status="rejected",
                   reason=f"{e.param or '-'}: {e.message}"[:MAX_REASON_CHARS], http_status=e.status)
        try:
            await self.commit(row)
        except Exception:  # noqa: BLE001 - the client gets its 4xx either way
            log.exception("rain serve: could not log a rejected request")

    async def has_request(self, request_id: str) -> bool:
        return await asyncio.to_thread(self.db.has_request, request_id)

    async def add_feedback(self, request_id: str, score: float, comment: str | None) -> bool:
        """Record feedback; False when the request already has one (the caller answers 409)."""
        ok = await asyncio.to_thread(self.db.add_feedback, request_id, score, comment)
        if ok:
            with self.metrics.registry.lock:
                self.metrics.feedback.inc()
        return ok


__all__ = ["RequestLog"]
