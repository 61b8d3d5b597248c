"""Several choices in one response: ``n > 1`` and lists of prompts (``/v1/completions``).

A request with P prompts (``"prompt": ["a", "b"]`` or ``[[ids], [ids]]``; chat has one) and ``n``
choices per prompt becomes P·n jobs, all at the request's one arm / λ; choice ``index`` =
``prompt_index · n + k`` (as OpenAI and vLLM number them). Caps (``serve/limits.py``): n ≤ 16,
prompts ≤ 64, P·n ≤ 128, else a 400 naming ``n`` or ``prompt``.

* **Seeds.** Choice 0 samples with the request's ``seed``; choice j > 0 with :func:`choice_seed`
  (a hash of seed and j), so every choice is reproducible and the choices differ. A seeded job runs
  alone (``GenParams.compat_key``), so its output does not depend on its neighbours. Greedy choices
  of one prompt are identical.
* **Usage.** ``prompt_tokens`` counts each prompt once; ``completion_tokens`` counts every choice.
* **Log.** One row per choice (each choice is one sample for the A/B report): choice 0's row has the
  response's id, choice j's ``<id>-<j>``; each row records ``n_choices`` and ``choice_index``, and
  each choice carries its row id in ``choice["rain"]["request_id"]`` (what feedback is posted for).
* **Streaming.** Every chunk carries its choice's ``index``; each choice's row is committed before
  its finishing chunk, the usage chunk (``include_usage``) has the totals, then ``[DONE]``.
* **Failures.** When one choice fails, the others are cancelled and the request is a 500 (rows:
  ``error`` for the failed choice, ``cancelled`` for the rest); a client that goes away cancels every
  choice (rows ``cancelled`` with the tokens produced).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from .errors import APIError
from .request_log import RequestLog
from .responses import ChunkWriter, Disconnected, Exchange, completion_body, generation_failed, sse, usage
from .scheduler import GenEvent

ANOTHER_FAILED = "another choice of this request failed"
CLIENT_GONE = "the client disconnected"


def choice_seed(seed: int | None, index: int) -> int | None:
    """The sampling seed of choice ``index``: the request's seed for choice 0, a hash of both otherwise."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.sha256(f"rain-choice:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2 ** 63 - 1)


def choice_id(response_id: str, index: int) -> str:
    """The log row id of choice ``index`` (choice 0 keeps the response's id)."""
    return response_id if index == 0 else f"{response_id}-{index}"


class _Tagged:
    """A job's ``events`` that forwards each event, tagged with the choice index, to one shared queue."""

    def __init__(self, shared: asyncio.Queue, index: int):
        self.shared, self.index = shared, index

    def put_nowait(self, ev: GenEvent) -> None:
        self.shared.put_nowait((self.index, ev))


@dataclass
class ChoiceSet:
    """The exchanges of one multi-choice response (index order) and their shared event queue."""

    exchanges: list[Exchange]
    queue: asyncio.Queue
    texts: list[list[str]] = field(init=False)
    dones: list[GenEvent | None] = field(init=False)
    logged: set[int] = field(default_factory=set)
    #: the first choice that failed and its error (every choice is cancelled then)
    failed: tuple[int, APIError] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.texts = [[] for _ in self.exchanges]
        self.dones = [None] * len(self.exchanges)

    @staticmethod
    def shared_events(n: int) -> tuple[asyncio.Queue, list[_Tagged]]:
        """A queue for a response of ``n`` choices and the ``events`` object of each choice's job."""
        q: asyncio.Queue = asyncio.Queue()
        return q, [_Tagged(q, i) for i in range(n)]

    @property
    def first(self) -> Exchange:
        return self.exchanges[0]

    def record(self, i: int, ev: GenEvent) -> None:
        """Fold one event of choice ``i`` in: its text, its end, or the first failure (which cancels all)."""
        if ev.kind == "delta":
            self.texts[i].append(ev.text)
        elif ev.kind == "error":
            if self.failed is None:
                self.failed = (i, generation_failed(ev.error))
                self.cancel_all()
        else:
            self.dones[i] = ev

    def cancel_all(self) -> None:
        for ex in self.exchanges:
            ex.cancel()

    def text(self, i: int) -> str:
        return "".join(self.texts[i])

    def prompt_tokens(self) -> int:
        """Each prompt once (the choices of one prompt share it)."""
        n = max(1, self.first.request.sampling.n)
        return sum(ex.prompt_tokens for ex in self.exchanges if ex.index % n == 0)

    def completion_tokens(self) -> int:
        return sum(d.completion_tokens for d in self.dones if d is not None)

    async def log(self, rlog: RequestLog, i: int, status: str, reason: str | None = None,
                  http_status: int | None = None) -> dict[str, Any]:
        row = await rlog.finish(self.exchanges[i], self.text(i), self.dones[i], status, reason, http_status)
        self.logged.add(i)
        return row

    def log_rest_quietly(self, rlog: RequestLog, status: str, reason: str, http_status: int) -> None:
        """Rows for the choices not yet logged (from a ``finally``: no await)."""
        for i, ex in enumerate(self.exchanges):
            if i not in self.logged:
                rlog.write_quietly(rlog.row(ex, self.text(i), self.dones[i], status, reason, http_status))
                self.logged.add(i)

    def release_all(self) -> None:
        for ex in self.exchanges:
            ex.release()


async def _events(cs: ChoiceSet, disconnected: Disconnected | None) -> AsyncIterator[tuple[int, GenEvent | None]]:
    """Every choice's events until all have ended; ``(-1, None)`` once when the client goes away (every
    choice is then cancelled and the events run on until each has ended)."""
    watch = asyncio.ensure_future(disconnected()) if disconnected is not None else None
    pending = set(range(len(cs.exchanges)))
    try:
        while pending:
            get = asyncio.ensure_future(cs.queue.get())
            if watch is not None:
                done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    watch = None
                    cs.cancel_all()
                    yield -1, None
                    continue
            i, ev = await get
            if ev.kind != "delta":
                pending.discard(i)
            yield i, ev
    finally:
        if watch is not None:
            watch.cancel()


def _status(cs: ChoiceSet, i: int, gone: bool) -> str:
    d = cs.dones[i]
    return "cancelled" if gone or d is None or d.finish_reason == "cancelled" else "ok"


def _choice(ex: Exchange, text: str, done: GenEvent, row: dict[str, Any]) -> dict[str, Any]:
    c = completion_body(ex, text, done, row)["choices"][0]
    c["index"] = ex.index
    c["rain"] = {"request_id": ex.rid, "format_valid": row["format_valid"], "compliant": row["compliant"]}
    return c


def body_of(cs: ChoiceSet, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``chat.completion`` / ``text_completion`` object with every choice, in index order."""
    ex = cs.first
    choices = [_choice(e, cs.text(i), cs.dones[i], rows[i]) for i, e in enumerate(cs.exchanges)]
    body = {"id": ex.response_id or ex.rid, "object": "chat.completion" if ex.request.chat else "text_completion",
            "created": ex.created, "model": ex.model_name, "choices": choices,
            "usage": usage(cs.prompt_tokens(), cs.completion_tokens()),
            "rain": {"arm": ex.arm, "lambda": ex.lam, "request_id": ex.response_id or ex.rid,
                     "n_choices": len(cs.exchanges)}}
    plp = ex.prompt_logprobs() if ex.request.chat else None
    if plp is not None:  # chat: the one prompt's logprobs, at the top level (vLLM's shape)
        body["prompt_logprobs"] = plp
    return body


async def reply_choices(cs: ChoiceSet, rlog: RequestLog, disconnected: Disconnected | None = None) -> JSONResponse:
    """The non-streaming response with every choice, sent after every choice's row is committed."""
    gone = False
    try:
        async for i, ev in _events(cs, disconnected):
            if ev is None:
                gone = True
            else:
                cs.record(i, ev)
        if cs.failed is not None:
            fi, err = cs.failed
            await cs.log(rlog, fi, "error", err.message, 500)
            for i in range(len(cs.exchanges)):
                if i != fi:
                    await cs.log(rlog, i, "cancelled", ANOTHER_FAILED, 500)
            raise err
        statuses = [_status(cs, i, gone) for i in range(len(cs.exchanges))]
        rows = [await cs.log(rlog, i, s, None if s == "ok" else CLIENT_GONE, 200 if s == "ok" else 499)
                for i, s in enumerate(statuses)]
    except asyncio.CancelledError:
        cs.cancel_all()
        raise
    finally:
        cs.release_all()
    if "cancelled" in statuses:
        return JSONResponse(APIError(499, CLIENT_GONE, code="cancelled").body(), status_code=499)
    return JSONResponse(body_of(cs, rows), headers=cs.first.headers())


async def _sse_choices(cs: ChoiceSet, rlog: RequestLog, disconnected: Disconnected | None) -> AsyncIterator[str]:
    writers = [ChunkWriter(ex) for ex in cs.exchanges]
    gone = False
    try:
        if cs.first.request.chat:
            for w in writers:
                yield w.role()
        async for i, ev in _events(cs, disconnected):
            if ev is None:
                gone = True
                continue
            cs.record(i, ev)
            if gone or cs.failed is not None:
                continue
            if ev.kind == "delta":
                out = writers[i].delta(ev.text)   # "" while a marker's start is held back
                if out:
                    yield out
            elif ev.kind != "error":
                status = _status(cs, i, False)
                await cs.log(rlog, i, status, None if status == "ok" else CLIENT_GONE,
                             200 if status == "ok" else 499)   # durable BEFORE its end is acknowledged
                yield writers[i].finish(ev.finish_reason, ev.stop_reason, ev.completion_tokens)
        if gone:
            return   # the rest is logged cancelled in ``finally``
        if cs.failed is not None:
            fi, err = cs.failed
            await cs.log(rlog, fi, "error", err.message, 500)
            await asyncio.to_thread(cs.log_rest_quietly, rlog, "cancelled", ANOTHER_FAILED, 500)  # off the loop
            yield sse(err.body())
            return
        if cs.first.request.include_usage:
            yield writers[0].usage(cs.completion_tokens(), cs.prompt_tokens())
        yield sse("[DONE]")
    finally:
        if len(cs.logged) < len(cs.exchanges):   # client gone (or the response task cancelled mid-stream)
            cs.cancel_all()
            cs.log_rest_quietly(rlog, "cancelled", CLIENT_GONE, 499)
        cs.release_all()


def stream_choices(cs: ChoiceSet, rlog: RequestLog, disconnected: Disconnected | None = None) -> StreamingResponse:
    """The SSE response of a multi-choice request: chunks tagged with their choice's index."""
    return StreamingResponse(_sse_choices(cs, rlog, disconnected), media_type="text/event-stream",
                             headers={**cs.first.headers(), "Cache-Control": "no-cache"})


__all__ = ["ChoiceSet", "body_of", "choice_id", "choice_seed", "reply_choices", "stream_choices"]
