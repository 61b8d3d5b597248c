"""What the server sends and records: OpenAI response objects, the SSE stream, the request log and metrics.

A generation request becomes an :class:`Exchange` once its job is submitted; :func:`reply` (JSON)
or :func:`stream_reply` (SSE) reads the job's events, and :class:`RequestLog` writes its row to the
:class:`~rain_adapter.serve.metrics_db.MetricsDB` and updates the Prometheus metrics.

Durability: a request's log row is committed before its response (or, when streaming, before the
final chunk and ``[DONE]``) is sent, so every acknowledged request is in the log.

Scoring: ``format_valid`` and ``compliant`` are evaluation's definitions
(:func:`~rain_adapter.evaluation.checks.think_format_ok`,
:func:`~rain_adapter.evaluation.checks.follow_instructions`), so A/B numbers and sweep numbers agree.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from ..evaluation.checks import follow_instructions, think_format_ok
from .errors import APIError
from .metrics_db import MetricsDB
from .prom import ServeMetrics
from .requests import GenerationRequest, RainCheck
from .scheduler import GenEvent, GenJob

log = logging.getLogger("rain_adapter.serve")


@dataclass
class Exchange:
    """One submitted generation request, from its job to the last byte of its response."""

    request: GenerationRequest
    job: GenJob
    model_name: str
    arm: str
    lam: float
    assignment: str                 # how the arm was chosen: explicit_lambda | explicit_arm | sticky | random
    created: int                    # unix seconds, the OpenAI ``created`` field
    cancel: Callable[[], None]      # tell the scheduler the client went away
    release: Callable[[], None]     # the request stops counting as in flight

    @property
    def rid(self) -> str:
        return self.job.job_id

    @property
    def endpoint(self) -> str:
        return "chat" if self.request.chat else "completions"

    @property
    def prompt_tokens(self) -> int:
        return len(self.job.prompt_ids)

    def rain(self) -> dict[str, Any]:
        return {"arm": self.arm, "lambda": self.lam, "request_id": self.rid}

    def headers(self) -> dict[str, str]:
        return {"X-Rain-Arm": self.arm, "X-Rain-Lambda": repr(self.lam), "X-Request-Id": self.rid}


# ----------------------------------------------------------------------------- scoring and logging
@dataclass(frozen=True)
class OutputScore:
    """A completion's thinking-format validity and compliance with its ``rain_checks``."""

    format_valid: bool
    compliant: bool | None          # None without (scorable) checks
    results: list[dict[str, Any]]   # per check: {"instruction_id", "ok", "error"?}


def score_output(text: str, checks: Sequence[RainCheck]) -> OutputScore:
    """Score ``text`` with evaluation's checks (the same functions the λ sweeps use)."""
    compliant, results = follow_instructions([(c.instruction_id, c.kwargs) for c in checks], text)
    rows = [{"instruction_id": r.instruction_id, "ok": r.ok, **({"error": r.error} if r.error else {})}
            for r in results]
    return OutputScore(think_format_ok(text), compliant, rows)


class RequestLog:
    """Writes request rows and feedback to the :class:`MetricsDB` and keeps the metrics in step."""

    def __init__(self, db: MetricsDB, metrics: ServeMetrics):
        self.db = db
        self.metrics = metrics

    def row(self, ex: Exchange, text: str, done: GenEvent | None, status: str) -> dict[str, Any]:
        """The log row of a finished (``status`` "ok"), failed ("error") or "cancelled" request."""
        job = ex.job
        score = score_output(text, ex.request.rain.checks) if status == "ok" else None
        ttft = (job.t_first_token - job.t_arrival) if job.t_first_token is not None else None
        return dict(id=ex.rid, endpoint=ex.endpoint, model=ex.model_name, user=ex.request.user, arm=ex.arm,
                    lam=ex.lam, assignment=ex.assignment, stream=ex.request.stream, prompt_tokens=ex.prompt_tokens,
                    completion_tokens=done.completion_tokens if done else 0,
                    latency_s=time.perf_counter() - job.t_arrival, ttft_s=ttft,
                    finish_reason=done.finish_reason if done else None,
                    format_valid=score.format_valid if score else None, compliant=score.compliant if score else None,
                    checks_json=(score.results or None) if score else None, batch_size=job.batch_size,
                    status=status)

    async def commit(self, row: dict[str, Any]) -> None:
        """Write ``row`` (committed when this returns), then count it in the metrics."""
        await asyncio.to_thread(self.db.log_request, row)
        m = self.metrics
        arm = row["arm"]
        with m.registry.lock:
            m.requests.inc(row["endpoint"], arm, row["status"])
            if row["status"] == "ok":
                m.prompt_tokens.inc(arm, by=row["prompt_tokens"])
                m.completion_tokens.inc(arm, by=row["completion_tokens"])
                m.latency.observe(row["latency_s"], arm)
                if row["ttft_s"] is not None:
                    m.ttft.observe(row["ttft_s"], arm)

    def write_cancelled(self, row: dict[str, Any]) -> None:
        """Log a request whose client went away mid-stream (from a generator's ``finally``: no await)."""
        try:
            self.db.log_request(row)
        except Exception:  # the stream is already gone; losing this row must not raise in its finally
            log.exception("rain serve: could not log a cancelled request")

    async def has_request(self, request_id: str) -> bool:
        return await asyncio.to_thread(self.db.has_request, request_id)

    async def add_feedback(self, request_id: str, score: float, comment: str | None) -> None:
        await asyncio.to_thread(self.db.add_feedback, request_id, score, comment)
        with self.metrics.registry.lock:
            self.metrics.feedback.inc()


def error_response(e: APIError, metrics: ServeMetrics) -> JSONResponse:
    """The OpenAI error body of ``e`` with its status; counted by status code."""
    metrics.errors.inc(str(e.status))
    return JSONResponse(e.body(), status_code=e.status)


def generation_failed(error: BaseException | None) -> APIError:
    return APIError(500, f"generation failed: {error}", type="server_error", code="generation_failed")


# ----------------------------------------------------------------------------- OpenAI objects
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(ex: Exchange, text: str, done: GenEvent, row: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` / ``text_completion`` object, with ``rain`` (arm, λ, id, format, compliance)."""
    fr = done.finish_reason
    if ex.request.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": fr,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": fr, "logprobs": None}
    return {"id": ex.rid, "object": "chat.completion" if ex.request.chat else "text_completion",
            "created": ex.created, "model": ex.model_name, "choices": [choice],
            "usage": usage(ex.prompt_tokens, done.completion_tokens),
            "rain": {**ex.rain(), "format_valid": row["format_valid"], "compliant": row["compliant"]}}


def sse(obj: dict[str, Any] | str) -> str:
    """One server-sent event line."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


class ChunkWriter:
    """The streaming chunks of one exchange (``chat.completion.chunk`` / ``text_completion``)."""

    def __init__(self, ex: Exchange):
        self.ex = ex
        self.object = "chat.completion.chunk" if ex.request.chat else "text_completion"

    def _chunk(self, choices: list[dict], usage_: dict | None = None) -> str:
        ex = self.ex
        d = {"id": ex.rid, "object": self.object, "created": ex.created, "model": ex.model_name,
             "choices": choices, "rain": ex.rain()}
        if usage_ is not None or ex.request.include_usage:  # with include_usage every chunk has the key
            d["usage"] = usage_
        return sse(d)

    def _choice(self, text: str | None, finish_reason: str | None, first: bool = False) -> dict:
        if not self.ex.request.chat:
            return {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}

    def role(self) -> str:
        """The opening chat chunk: the assistant role and empty content."""
        return self._chunk([self._choice("", None, first=True)])

    def delta(self, text: str) -> str:
        return self._chunk([self._choice(text, None)])

    def finish(self, finish_reason: str | None) -> str:
        return self._chunk([self._choice(None if self.ex.request.chat else "", finish_reason)])

    def usage(self, completion_tokens: int) -> str:
        """The ``include_usage`` chunk: no choices, the usage."""
        return self._chunk([], usage(self.ex.prompt_tokens, completion_tokens))


# ----------------------------------------------------------------------------- driving an exchange
async def _collect(ex: Exchange, rlog: RequestLog) -> tuple[str, GenEvent]:
    """The whole completion and its "done" event; a failed generation is logged and raised as a 500."""
    parts: list[str] = []
    while True:
        ev: GenEvent = await ex.job.events.get()
        if ev.kind == "delta":
            parts.append(ev.text)
        elif ev.kind == "error":
            await rlog.commit(rlog.row(ex, "".join(parts), None, "error"))
            raise generation_failed(ev.error)
        else:
            return "".join(parts), ev


async def reply(ex: Exchange, rlog: RequestLog) -> JSONResponse:
    """The non-streaming response, sent after the request's row is committed."""
    try:
        text, done = await _collect(ex, rlog)
        row = rlog.row(ex, text, done, "ok")
        await rlog.commit(row)  # durable BEFORE the response is sent
    except asyncio.CancelledError:
        ex.cancel()
        raise
    finally:
        ex.release()
    return JSONResponse(completion_body(ex, text, done, row), headers=ex.headers())


async def _sse_events(ex: Exchange, rlog: RequestLog) -> AsyncIterator[str]:
    chunks = ChunkWriter(ex)
    parts: list[str] = []
    logged = False
    try:
        if ex.request.chat:
            yield chunks.role()
        while True:
            ev = await ex.job.events.get()
            if ev.kind == "delta":
                parts.append(ev.text)
                yield chunks.delta(ev.text)
            elif ev.kind == "error":
                await rlog.commit(rlog.row(ex, "".join(parts), None, "error"))
                logged = True
                yield sse(generation_failed(ev.error).body())
                return
            else:
                break
        await rlog.commit(rlog.row(ex, "".join(parts), ev, "ok"))  # durable BEFORE the end is acknowledged
        logged = True
        yield chunks.finish(ev.finish_reason)
        if ex.request.include_usage:
            yield chunks.usage(ev.completion_tokens)
        yield sse("[DONE]")
    finally:
        if not logged:  # client went away mid-stream
            ex.cancel()
            rlog.write_cancelled(rlog.row(ex, "".join(parts), None, "cancelled"))
        ex.release()


def stream_reply(ex: Exchange, rlog: RequestLog) -> StreamingResponse:
    """The SSE response: chunks as text arrives, the row committed before the last chunk and ``[DONE]``."""
    return StreamingResponse(_sse_events(ex, rlog), media_type="text/event-stream",
                             headers={**ex.headers(), "Cache-Control": "no-cache"})


# ----------------------------------------------------------------------------- small endpoints
def health_body(model_name: str, queue_depth: int, in_flight: int, started: float) -> dict[str, Any]:
    return {"status": "ok", "model": model_name, "queue_depth": queue_depth, "in_flight": in_flight,
            "uptime_s": time.time() - started}


def models_body(model_name: str, started: float, lambda_range: tuple[float, float], arms) -> dict[str, Any]:
    """``GET /v1/models``: the one served model, with its λ range and arms under ``rain``."""
    lo, hi = lambda_range
    return {"object": "list", "data": [{
        "id": model_name, "object": "model", "created": int(started), "owned_by": "rain-adapter",
        "rain": {"lambda_range": [lo, hi], "arms": [{"name": a.name, "lambda": a.lam, "weight": a.weight}
                                                    for a in arms]}}]}


__all__ = ["ChunkWriter", "Exchange", "OutputScore", "RequestLog", "completion_body", "error_response",
           "generation_failed", "health_body", "models_body", "reply", "score_output", "sse", "stream_reply",
           "usage"]
