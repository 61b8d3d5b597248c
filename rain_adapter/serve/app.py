"""The OpenAI-compatible HTTP API (FastAPI): routes only.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with
SSE streaming), ``GET /health``, ``GET /metrics`` (Prometheus text), ``POST /v1/rain/feedback``,
``GET /v1/rain/ab``, ``GET /v1/models/{id}``, ``POST /tokenize``, ``POST /detokenize`` (vLLM's). Request extensions (``rain_lambda``, ``rain_arm``, ``rain_checks``) are parsed
in :mod:`~rain_adapter.serve.requests`; responses carry ``"rain": {"arm", "lambda", "request_id"}``
and the plain-ASCII ``X-Rain-Lambda`` / ``X-Rain-Arm`` (ASCII arm names only) headers
(:mod:`~rain_adapter.serve.responses`, which also commits each request's log row before its response
is sent).

The handlers are module functions that find the :class:`ServeState` on ``request.app.state.rain``;
they reach the model only through the :class:`~rain_adapter.serve.scheduler.Scheduler` protocol.
The API key and the body size are checked before a route runs
(:class:`~rain_adapter.serve.limits.GuardMiddleware`); a generation request is validated in full
(fields, then a tokenizer-free bound on the prompt's length, then the chat template in its bounded
sandbox, :mod:`~rain_adapter.serve.templates`, then the exact token count) before a job is made, and
templating and tokenisation run in a worker thread, off the event loop. ``/tokenize`` and
``/detokenize`` have the same limits. :func:`create_app` refuses to build an app whose chat templates
would not render in the bounded sandbox.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .choices import ChoiceSet, choice_id, choice_seed, reply_choices, stream_choices
from .errors import APIError, bad_request
from .limits import GuardMiddleware, check_prompt_fits, min_prompt_tokens, template_chars
from .report import ab_report, to_json
from ..evaluation.checks import THINK_CLOSE, THINK_OPEN
from .requests import parse_chat, parse_completion, parse_feedback, parse_json_body, skip_ids
from .responses import (
    Exchange,
    error_response,
    health_body,
    model_card,
    models_body,
    reply,
    stream_reply,
)
from .templates import TemplateLimits, check_bounded_rendering
from .tokenize import TokenizeLimits, detokenize_body, tokenize_body
from .scheduler import GenJob
from .state import ServeState, serve_state_from

log = logging.getLogger("rain_adapter.serve")
router = APIRouter()  # routes return plain dicts: response_model=None keeps FastAPI from re-validating them


def _state(request: Request) -> ServeState:
    return request.app.state.rain


async def _json_body(request: Request) -> dict:
    return parse_json_body(await request.body())


def _disconnected(request: Request):
    """An awaitable that returns once the client has gone (``http.disconnect``)."""
    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    return wait


def _precheck(req, state: ServeState) -> None:
    """Length checks that need no tokenizer: max_tokens and a lower bound on the prompt's tokens."""
    mt, n = req.sampling.max_tokens, state.context_length
    if mt is not None and mt >= n:
        raise bad_request(f"max_tokens={mt} leaves no room for a prompt: --max-model-len is {n}", "max_tokens",
                          code="context_length_exceeded")
    ids = getattr(req, "prompt", None)
    lower = len(ids) if isinstance(ids, tuple) else min_prompt_tokens(req.texts(), state.bytes_per_token)
    if req.sampling.truncate is not None:  # the prompt is cut to its last k tokens (the body's size bounds it)
        lower = min(lower, n if req.sampling.truncate == -1 else req.sampling.truncate)
    check_prompt_fits(lower, n, req.prompt_param, reserve=mt or 1, why=f"; with max_tokens={mt or 1}")


def _template_limits(state: ServeState) -> TemplateLimits:
    """The bounds of a chat-template render: as much text as --max-model-len tokens can hold."""
    return TemplateLimits(max_chars=template_chars(state.context_length, state.bytes_per_token,
                                                   state.max_body_bytes))


def _tokenize_limits(state: ServeState) -> TokenizeLimits:
    return TokenizeLimits(state.model_name, state.context_length, state.bytes_per_token, _template_limits(state),
                          state.limits.trust_request_chat_template)


# ----------------------------------------------------------------------------- generation
def _exchanges(state: ServeState, parts: list, ids: list[list[int]], params: list, rid: str, arm: str, lam: float,
               how: str) -> tuple[list[Exchange], ChoiceSet | None]:
    """One exchange (and job) per choice: ``n`` per prompt, index = prompt_index·n + k (serve/choices.py)."""
    n = parts[0].sampling.n
    total, loop, created = n * len(parts), asyncio.get_running_loop(), int(time.time())
    queue, tagged = ChoiceSet.shared_events(total) if total > 1 else (None, [asyncio.Queue()])
    exs = []
    for index in range(total):
        part, pid, p = parts[index // n], ids[index // n], params[index // n]
        p = replace(p, seed=choice_seed(p.seed, index)) if index else p
        job = GenJob(choice_id(rid, index), pid, lam, p, loop, tagged[index])
        exs.append(Exchange(request=part, job=job, model_name=state.model_name, arm=arm, lam=lam, assignment=how,
                            created=created, cancel=lambda job=job: state.scheduler.cancel(job),
                            release=state.release, tokenizer=state.tokenizer, index=index, n_choices=total,
                            response_id=rid if total > 1 else None))
    return exs, (ChoiceSet(exs, queue) if total > 1 else None)


def _submit_all(state: ServeState, exs: list[Exchange]) -> None:
    """Submit every choice's job; when one is refused, the ones already submitted are cancelled."""
    for k, ex in enumerate(exs):
        try:
            state.submit(ex.job)
        except APIError:
            for prev in exs[:k]:
                prev.cancel()
                prev.release()
            raise


async def _generate(request: Request, chat: bool) -> Response:
    """Validate, submit the job(s), and answer with JSON or an SSE stream; a refusal is logged too."""
    state = _state(request)
    t0 = time.perf_counter()
    body: object = None
    try:
        body = await _json_body(request)
        req = parse_chat(body, state.limits) if chat else parse_completion(body, state.limits)
        parts = [req] if chat else req.split()
        for part in parts:
            _precheck(part, state)
        tl = _template_limits(state)
        ids = await run_in_threadpool(lambda: [part.sampling.truncated(part.encode(state.tokenizer, tl),
                                                                         state.context_length) for part in parts])
        skip = skip_ids(state.tokenizer, req.sampling.skip_special, (THINK_OPEN, THINK_CLOSE))
        params = [part.sampling.gen_params(len(i), state.context_length, state.max_tokens_cap, req.prompt_param,
                                           skip) for part, i in zip(parts, ids)]
        key = json.dumps(req.messages if chat else (list(req.prompts) or req.prompt), sort_keys=True)
        arm, lam, how = state.assigner.choose(req.rain.arm, req.rain.lam, req.user, key)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        exs, choices = _exchanges(state, parts, ids, params, rid, arm, lam, how)
        for ex in exs:  # the rate-limit bucket of a request without a user (serve/rewards.py)
            ex.client = request.client.host if request.client else None
        _submit_all(state, exs)
    except APIError as e:
        await state.request_log.rejected("chat" if chat else "completions", state.model_name, body, e, t0)
        raise
    gone = _disconnected(request)
    if choices is not None:
        return stream_choices(choices, state.request_log, gone) if req.stream else \
            await reply_choices(choices, state.request_log, gone)
    ex = exs[0]
    return stream_reply(ex, state.request_log, gone) if req.stream else await reply(ex, state.request_log, gone)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _generate(request, chat=True)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _generate(request, chat=False)


# ----------------------------------------------------------------------------- the rest
@router.get("/health", response_model=None)
async def health(request: Request) -> JSONResponse:
    """200 while requests can be served; 503 (status "unhealthy", with the reason) otherwise."""
    state = _state(request)
    h = state.health()
    ok = h.healthy and h.accepting
    reason = h.reason or (None if h.accepting else "the scheduler is not accepting requests")
    return JSONResponse(health_body(state.model_name, h.queue_depth, state.inflight, state.started, ok, reason),
                        status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(_state(request).metrics.registry.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models", response_model=None)
async def models(request: Request) -> dict[str, Any]:
    state = _state(request)
    return models_body(state.model_name, state.started, state.lambda_range, state.arms, state.context_length,
                       state.lambda_grid)


@router.get("/v1/models/{model_id:path}", response_model=None)
async def model(request: Request, model_id: str) -> dict[str, Any]:
    state = _state(request)
    if model_id != state.model_name:
        raise APIError(404, f"the model {model_id!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")
    return model_card(state.model_name, state.started, state.lambda_range, state.arms, state.context_length,
                      state.lambda_grid)


@router.post("/tokenize", response_model=None)
async def tokenize(request: Request) -> dict[str, Any]:
    state = _state(request)
    body = await _json_body(request)
    return await run_in_threadpool(tokenize_body, body, state.tokenizer, _tokenize_limits(state))


@router.post("/detokenize", response_model=None)
async def detokenize(request: Request) -> dict[str, Any]:
    state = _state(request)
    body = await _json_body(request)
    return await run_in_threadpool(detokenize_body, body, state.tokenizer, _tokenize_limits(state))


@router.post("/v1/rain/feedback", response_model=None)
async def feedback(request: Request) -> dict[str, Any]:
    """Attach a score (|score| ≤ 1e6, finite) and comment to a logged request: one per request id.

    404 for an id not in the log; 409 when the request already has feedback (the first one stands).
    """
    fb = parse_feedback(await _json_body(request))
    state = _state(request)
    rlog = state.request_log
    if not await rlog.has_request(fb.request_id):
        raise APIError(404, f"no request with id {fb.request_id!r} in the log", param="request_id",
                       code="not_found")
    if not await rlog.add_feedback(fb.request_id, fb.score, fb.comment):
        raise APIError(409, f"request {fb.request_id!r} already has feedback (one per request)",
                       param="request_id", code="feedback_exists")
    await asyncio.to_thread(state.feedback_reward, fb.request_id, fb.score)
    return {"ok": True, "request_id": fb.request_id, "score": fb.score}


@router.get("/v1/rain/ab", response_model=None)
async def ab(request: Request) -> JSONResponse:
    state = _state(request)
    rows = await asyncio.to_thread(state.db.rows)
    allocs = await asyncio.to_thread(state.db.allocations)
    rep = await asyncio.to_thread(ab_report, rows, allocs)
    return JSONResponse(json.loads(to_json(rep)))


# ----------------------------------------------------------------------------- errors
async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return error_response(e, _state(request).metrics)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return error_response(APIError(e.status_code, str(e.detail), code=code), _state(request).metrics)


async def _any_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("rain serve: unhandled error")
    return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error",
                                   code="internal_error"), _state(request).metrics)


# ----------------------------------------------------------------------------- the app
def _lifespan(state: ServeState):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        try:
            yield
        finally:
            # uvicorn has already waited for in-flight HTTP requests; drain anything still queued.
            await asyncio.to_thread(state.stop)
            log.info("rain serve: scheduler drained, request log flushed")

    return lifespan


def create_app(state: ServeState) -> FastAPI:
    """Build the FastAPI app; the scheduler starts in the lifespan and drains on shutdown. Refuses
    (RuntimeError) when chat templates would not render in the bounded sandbox here."""
    check_bounded_rendering(state.tokenizer)
    app = FastAPI(title="rain-adapter", lifespan=_lifespan(state))
    app.state.rain = state
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _any_error)
    app.include_router(router)
    app.add_middleware(GuardMiddleware, config=lambda: (state.api_key, state.protect_all, state.max_body_bytes,
                                                        lambda code: state.metrics.errors.inc(str(code))))
    return app


__all__ = ["ServeState", "create_app", "serve_state_from"]
