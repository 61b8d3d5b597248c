"""What the server sends and records: OpenAI response objects, the SSE stream, the request log and metrics.

A generation request becomes an :class:`Exchange` once its job is submitted; :func:`reply` (JSON)
or :func:`stream_reply` (SSE) reads the job's events, and
:class:`~rain_adapter.serve.request_log.RequestLog` writes its row (ok, error or cancelled).

Client disconnects: both watch the connection (``disconnected``: an awaitable that returns when the
client has gone) while the job runs; a disconnect cancels the job (the scheduler checks between
decode steps) and the row is logged ``cancelled`` with the tokens produced.

Durability: a request's log row is committed before its response (or, when streaming, before the
final chunk and ``[DONE]``) is sent, so every acknowledged request is in the log.

Scoring (:mod:`~rain_adapter.serve.scoring`): evaluation's definitions, with a check that cannot
run left unscored.

Reasoning (:mod:`~rain_adapter.serve.reasoning`): a chat request with ``reasoning_parser``
``deepseek_r1`` (the default) gets the thinking in ``message.reasoning_content`` (streaming:
``delta.reasoning_content`` chunks, then ``delta.content``) and the answer in ``content``; with
``none`` the thinking stays in ``content``; with ``include_reasoning: false`` the thinking is dropped
(``reasoning_content`` null, no reasoning chunks). Scoring and the log see the full text either way.

Other decode-side fields (:mod:`~rain_adapter.serve.field_policy`): chat ``echo`` prepends the last
message, when it is the assistant's, to the content (streaming: a content chunk after the role);
``prompt_logprobs`` (vLLM's shape: ``choices[i].prompt_logprobs`` on completions, a top-level
``prompt_logprobs`` on chat); ``return_tokens_as_token_ids``; ``stream_options.continuous_usage_stats``
puts the usage so far on every chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from .errors import APIError
from .logprobs import chat_logprobs, completion_logprobs, prompt_logprobs_json
from .prom import ServeMetrics
from .reasoning import ReasoningSplitter, prompt_opens_thinking, split_reasoning
from .request_log import RequestLog
from .requests import GenerationRequest
from .scheduler import GenEvent, GenJob
from .scoring import OutputScore, score_output

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
    tokenizer: Any = None           # for logprobs' token strings and echo
    index: int = 0                  # the choice's index (serve/choices.py: prompt_index·n + k)
    n_choices: int = 1              # choices in the whole response
    response_id: str | None = None  # the response's id when it has several choices (None: ``rid``)
    client: str | None = None       # the remote address (the reward rate limit's key without a user)

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

    @property
    def splits_reasoning(self) -> bool:
        """Whether the thinking goes to ``reasoning_content`` (chat, ``reasoning_parser`` deepseek_r1)."""
        return self.request.chat and getattr(self.request, "reasoning_parser", "none") == "deepseek_r1"

    @property
    def includes_reasoning(self) -> bool:
        """False with ``include_reasoning: false``: the split-off thinking is dropped from the response."""
        return getattr(self.request, "include_reasoning", True)

    def echo_text(self) -> str | None:
        """What ``echo`` puts before the generated text: on chat the last message when it is the
        assistant's; on completions the prompt (the text of the tokens the model saw when it was given as
        ids or cut by ``truncate_prompt_tokens``); None without ``echo``."""
        if self.request.chat:
            return self.request.echo_text()
        sp = self.request.sampling
        if not getattr(sp, "echo", False):
            return None
        p = self.request.prompt
        if isinstance(p, str) and getattr(sp, "truncate", None) is None:
            return p
        return self.tokenizer.decode(list(self.job.prompt_ids), skip_special_tokens=False)

    def echoed_logprobs(self) -> list:
        """Completions ``echo`` + ``logprobs``: the prompt tokens' entries, cut to the request's k."""
        k = self.job.params.logprobs or 0
        return [(t, v, top[:k]) for t, v, top in self.job.prompt_logprobs or []]

    def prompt_logprobs(self) -> list | None:
        """vLLM's ``prompt_logprobs`` of this exchange, or None when not asked."""
        k = getattr(self.request.sampling, "prompt_top", None)
        if k is None or self.job.prompt_logprobs is None or self.tokenizer is None:
            return None
        return prompt_logprobs_json(self.tokenizer, self.job.prompt_logprobs, self.job.prompt_ranks, k)

    def opens_thinking(self) -> bool:
        """Whether the generation prompt already opened the thinking block (R1-style templates)."""
        return prompt_opens_thinking(self.tokenizer, self.job.prompt_ids)

    def headers(self) -> dict[str, str]:
        # plain ASCII only: X-Rain-Arm when the arm's name is printable ASCII (else the name is only in
        # the body's "rain" field, never percent-encoded); X-Rain-Lambda carries the arm's λ
        a = self.arm
        arm = {"X-Rain-Arm": a} if a and a.isascii() and a.isprintable() and a == a.strip() else {}
        return {**arm, "X-Rain-Lambda": repr(self.lam), "X-Request-Id": self.rid}


# ----------------------------------------------------------------------------- errors
def error_response(e: APIError, metrics: ServeMetrics) -> JSONResponse:
    """The OpenAI error body of ``e`` with its status; counted by status code."""
    metrics.errors.inc(str(e.status))
    return JSONResponse(e.body(), status_code=e.status)


def generation_failed(error: BaseException | None) -> APIError:
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error",
                    code="generation_failed")


# ----------------------------------------------------------------------------- OpenAI objects
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(ex: Exchange, text: str, done: GenEvent, row: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` / ``text_completion`` object, with ``rain`` (arm, λ, id, format, compliance)."""
    fr = done.finish_reason
    job, tok = ex.job, ex.tokenizer
    want = job.params.logprobs is not None and tok is not None
    sp = ex.request.sampling
    as_ids = getattr(sp, "as_token_ids", False)
    plp = ex.prompt_logprobs()
    if ex.request.chat:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if ex.splits_reasoning:
            reasoning, content = split_reasoning(text, ex.opens_thinking())
            message = {"role": "assistant", "content": content,
                       "reasoning_content": reasoning if ex.includes_reasoning else None}
        if ex.echo_text() is not None:
            message["content"] = ex.echo_text() + (message["content"] or "")
        choice = {"index": 0, "message": message, "finish_reason": fr, "stop_reason": done.stop_reason,
                  "logprobs": chat_logprobs(tok, job.token_logprobs, as_ids) if want else None}
    else:
        lp = None
        echo = ex.echo_text()
        if echo is not None:
            text = echo + text
        if want:
            prompt = ex.echoed_logprobs() if echo is not None else []
            lp = completion_logprobs(tok, prompt + job.token_logprobs, as_ids=as_ids)
        choice = {"index": 0, "text": text, "finish_reason": fr, "stop_reason": done.stop_reason, "logprobs": lp}
        if plp is not None:
            choice["prompt_logprobs"] = plp
    body = {"id": ex.rid, "object": "chat.completion" if ex.request.chat else "text_completion",
            "created": ex.created, "model": ex.model_name, "choices": [choice],
            "usage": usage(ex.prompt_tokens, done.completion_tokens),
            "rain": {**ex.rain(), "format_valid": row["format_valid"], "compliant": row["compliant"]}}
    if ex.request.chat and plp is not None:
        body["prompt_logprobs"] = plp
    return body


def sse(obj: dict[str, Any] | str) -> str:
    """One server-sent event line."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


class ChunkWriter:
    """The streaming chunks of one exchange (``chat.completion.chunk`` / ``text_completion``); with
    the reasoning split, :meth:`delta` may hold text back (a marker's start) and return ``""``."""

    def __init__(self, ex: Exchange):
        self.ex = ex
        self.object = "chat.completion.chunk" if ex.request.chat else "text_completion"
        self.index = ex.index
        self.splitter = ReasoningSplitter(ex.opens_thinking()) if ex.splits_reasoning else None
        self.lp_sent = 0        # generated tokens whose logprobs were sent
        self.lp_offset = 0      # completions: text_offset of the next token's logprobs
        self.echo_pending = not ex.request.chat and ex.echo_text() is not None

    def _chunk(self, choices: list[dict], usage_: dict | None = None) -> str:
        ex = self.ex
        d = {"id": ex.response_id or ex.rid, "object": self.object, "created": ex.created, "model": ex.model_name,
             "choices": choices, "rain": ex.rain()}
        if usage_ is None and choices and getattr(ex.request, "continuous_usage", False):
            usage_ = usage(ex.prompt_tokens, ex.job.n_generated)   # continuous_usage_stats: the usage so far
        if usage_ is not None or ex.request.include_usage:  # with include_usage every chunk has the key
            d["usage"] = usage_
        return sse(d)

    def _logprobs(self, entries: list | None = None) -> dict | None:
        """The logprobs of the generated tokens not sent yet (or of ``entries``), None without logprobs.

        A chunk carries the tokens the worker has recorded when it is written, so a token's logprobs may
        come one chunk before its text; every token's come exactly once, in order."""
        ex, tok = self.ex, self.ex.tokenizer
        if ex.job.params.logprobs is None or tok is None:
            return None
        if entries is None:
            entries = list(ex.job.token_logprobs[self.lp_sent:])
            self.lp_sent += len(entries)
        as_ids = getattr(ex.request.sampling, "as_token_ids", False)
        if ex.request.chat:
            return chat_logprobs(tok, entries, as_ids)
        lp = completion_logprobs(tok, entries, self.lp_offset, as_ids)
        if entries:
            last = tok.decode([entries[-1][0]], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self.lp_offset = lp["text_offset"][-1] + len(last)
        return lp

    def _choice(self, text: str | None, finish_reason: str | None, first: bool = False,
                stop_reason: str | int | None = None, logprobs: dict | None = None) -> dict:
        # stop_reason as vLLM streams it: on every completions chunk (null until the last), on chat's last
        if not self.ex.request.chat:
            return {"index": self.index, "text": text or "", "finish_reason": finish_reason,
                    "stop_reason": stop_reason, "logprobs": logprobs}
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        c = {"index": self.index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
        return {**c, "stop_reason": stop_reason} if finish_reason is not None else c

    def _echo(self) -> str:
        """Completions ``echo``: the prompt (with its logprobs) as the first chunk, once."""
        if not self.echo_pending:
            return ""
        self.echo_pending = False
        lp = self._logprobs(self.ex.echoed_logprobs()) if self.ex.job.params.logprobs is not None else None
        return self._chunk([self._choice(self.ex.echo_text(), None, logprobs=lp)])

    def role(self) -> str:
        """The opening chat chunk: the assistant role and empty content (then chat ``echo``'s text)."""
        echo = self.ex.echo_text()
        return self._chunk([self._choice("", None, first=True)]) + (self._pieces([("content", echo)]) if echo else "")

    def _pieces(self, pieces: list[tuple[str, str]], logprobs: bool = False) -> str:
        """Chunks of ``(field, text)`` pieces; with ``logprobs``, the first carries the unsent logprobs."""
        if not self.ex.includes_reasoning:
            pieces = [(f, t) for f, t in pieces if f != "reasoning_content"]
        return "".join(self._chunk([{"index": self.index, "delta": {field: text}, "finish_reason": None,
                                     "logprobs": self._logprobs() if logprobs and i == 0 else None}])
                       for i, (field, text) in enumerate(pieces))

    def delta(self, text: str) -> str:
        """The chunk(s) of a text delta: ``content``, or ``reasoning_content`` / ``content`` when split
        (completions ``echo``: the prompt's chunk first), with the logprobs of the tokens produced."""
        if self.splitter is not None:
            return self._pieces(self.splitter.feed(text), logprobs=True)
        return self._echo() + self._chunk([self._choice(text, None, logprobs=self._logprobs())])

    def finish(self, finish_reason: str | None, stop_reason: str | int | None = None,
               completion_tokens: int | None = None) -> str:
        """The text still held back (if any), then the finishing chunk (with ``stop_reason``; with
        ``continuous_usage_stats``, the final usage when ``completion_tokens`` is given)."""
        held = self._pieces(self.splitter.flush(), logprobs=True) if self.splitter is not None else ""
        final = usage(self.ex.prompt_tokens, completion_tokens) \
            if completion_tokens is not None and getattr(self.ex.request, "continuous_usage", False) else None
        lp = self._logprobs()
        if lp is not None and not (lp.get("content") or lp.get("tokens")):
            lp = None   # nothing left to send
        return held + self._echo() + self._chunk([self._choice(None if self.ex.request.chat else "", finish_reason,
                                                               stop_reason=stop_reason, logprobs=lp)], final)

    def usage(self, completion_tokens: int, prompt_tokens: int | None = None) -> str:
        """The ``include_usage`` chunk: no choices, the usage (``prompt_tokens``: this exchange's by default)."""
        return self._chunk([], usage(self.ex.prompt_tokens if prompt_tokens is None else prompt_tokens,
                                     completion_tokens))


# ----------------------------------------------------------------------------- driving an exchange
Disconnected = Callable[[], Awaitable[None]]


async def _next_event(ex: Exchange, watch: asyncio.Future | None) -> GenEvent | None:
    """The job's next event, or None when the client went away first (the job is then cancelled)."""
    get = asyncio.ensure_future(ex.job.events.get())
    if watch is None:
        return await get
    done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    ex.cancel()
    return None


async def _drain(ex: Exchange) -> GenEvent | None:
    """After a cancel: wait for the job's last event (it ends within a decode step)."""
    while True:
        ev = await ex.job.events.get()
        if ev.kind != "delta":
            return ev if ev.kind == "done" else None


def _watch(disconnected: Disconnected | None) -> asyncio.Future | None:
    return asyncio.ensure_future(disconnected()) if disconnected is not None else None


async def _collect(ex: Exchange, rlog: RequestLog, watch) -> tuple[str, GenEvent | None, str]:
    """(text, done event, status); a failed generation is logged and raised as a 500."""
    parts: list[str] = []
    while True:
        ev = await _next_event(ex, watch)
        if ev is None:
            return "".join(parts), await _drain(ex), "cancelled"
        if ev.kind == "delta":
            parts.append(ev.text)
        elif ev.kind == "error":
            err = generation_failed(ev.error)
            await rlog.finish(ex, "".join(parts), None, "error", err.message, 500)
            raise err
        else:
            return "".join(parts), ev, ("cancelled" if ev.finish_reason == "cancelled" else "ok")


async def reply(ex: Exchange, rlog: RequestLog, disconnected: Disconnected | None = None) -> JSONResponse:
    """The non-streaming response, sent after the request's row is committed."""
    watch = _watch(disconnected)
    try:
        text, done, status = await _collect(ex, rlog, watch)
        reason = "the client disconnected" if status == "cancelled" else None
        row = await rlog.finish(ex, text, done, status, reason, 499 if status == "cancelled" else 200)
    except asyncio.CancelledError:
        ex.cancel()
        raise
    finally:
        if watch is not None:
            watch.cancel()
        ex.release()
    if status == "cancelled":
        return JSONResponse(APIError(499, "the client disconnected", code="cancelled").body(), status_code=499)
    return JSONResponse(completion_body(ex, text, done, row), headers=ex.headers())


async def _sse_events(ex: Exchange, rlog: RequestLog, disconnected: Disconnected | None) -> AsyncIterator[str]:
    chunks = ChunkWriter(ex)
    parts: list[str] = []
    logged = False
    watch = _watch(disconnected)
    try:
        if ex.request.chat:
            yield chunks.role()
        while True:
            ev = await _next_event(ex, watch)
            if ev is None:
                done = await _drain(ex)
                await rlog.finish(ex, "".join(parts), done, "cancelled", "the client disconnected", 499)
                logged = True
                return
            if ev.kind == "delta":
                parts.append(ev.text)
                out = chunks.delta(ev.text)
                if out:
                    yield out
            elif ev.kind == "error":
                err = generation_failed(ev.error)
                await rlog.finish(ex, "".join(parts), None, "error", err.message, 500)
                logged = True
                yield sse(err.body())
                return
            else:
                break
        status = "cancelled" if ev.finish_reason == "cancelled" else "ok"
        await rlog.finish(ex, "".join(parts), ev, status)  # durable BEFORE the end is acknowledged
        logged = True
        yield chunks.finish(ev.finish_reason, ev.stop_reason, ev.completion_tokens)
        if ex.request.include_usage:
            yield chunks.usage(ev.completion_tokens)
        yield sse("[DONE]")
    finally:
        if watch is not None:
            watch.cancel()
        if not logged:  # the response task was cancelled mid-stream (client gone)
            ex.cancel()
            rlog.write_quietly(rlog.row(ex, "".join(parts), None, "cancelled", "the client disconnected", 499))
        ex.release()


def stream_reply(ex: Exchange, rlog: RequestLog, disconnected: Disconnected | None = None) -> StreamingResponse:
    """The SSE response: chunks as text arrives, the row committed before the last chunk and ``[DONE]``."""
    return StreamingResponse(_sse_events(ex, rlog, disconnected), media_type="text/event-stream",
                             headers={**ex.headers(), "Cache-Control": "no-cache"})


# ----------------------------------------------------------------------------- small endpoints
def health_body(model_name: str, queue_depth: int, in_flight: int, started: float, healthy: bool = True,
                reason: str | None = None) -> dict[str, Any]:
    return {"status": "ok" if healthy else "unhealthy", "model": model_name, "queue_depth": queue_depth,
            "in_flight": in_flight, "uptime_s": time.time() - started, **({"reason": reason} if reason else {})}


def model_card(model_name: str, started: float, lambda_range: tuple[float, float], arms,
               max_model_len: int | None = None, lambda_grid: tuple[float, ...] | None = None) -> dict[str, Any]:
    """The served model's card (``GET /v1/models/{id}``), with ``max_model_len`` and the λ range / arms
    (and ``lambda_grid``, the only λ served, when ``--lambda-grid`` set one)."""
    lo, hi = lambda_range
    rain: dict[str, Any] = {"lambda_range": [lo, hi], "arms": [{"name": a.name, "lambda": a.lam, "weight": a.weight}
                                                             for a in arms]}
    if lambda_grid is not None:
        rain["lambda_grid"] = list(lambda_grid)
    return {"id": model_name, "object": "model", "created": int(started), "owned_by": "rain-adapter",
            "root": model_name, "parent": None, "max_model_len": max_model_len, "rain": rain}


def models_body(model_name: str, started: float, lambda_range: tuple[float, float], arms,
                max_model_len: int | None = None, lambda_grid: tuple[float, ...] | None = None) -> dict[str, Any]:
    """``GET /v1/models``: the one served model."""
    return {"object": "list", "data": [model_card(model_name, started, lambda_range, arms, max_model_len,
                                                  lambda_grid)]}


__all__ = ["ChunkWriter", "Exchange", "OutputScore", "RequestLog", "completion_body", "error_response",
           "generation_failed", "health_body", "model_card", "models_body", "reply", "score_output", "sse",
           "stream_reply", "usage"]
