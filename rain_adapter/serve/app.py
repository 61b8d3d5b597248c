"""The OpenAI-compatible HTTP API (FastAPI): routes only.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with
SSE streaming), ``GET /health``, ``GET /metrics`` (Prometheus text), ``POST /v1/rain/feedback``,
``GET /v1/rain/ab``. Request extensions (``rain_lambda``, ``rain_arm``, ``rain_checks``) are parsed
in :mod:`~rain_adapter.serve.requests`; responses carry ``"rain": {"arm", "lambda", "request_id"}``
and the ``X-Rain-Arm`` / ``X-Rain-Lambda`` headers (:mod:`~rain_adapter.serve.responses`, which also
commits each request's log row before its response is sent).

The handlers are module functions that find the :class:`ServeState` on ``request.app.state.rain``;
they reach the model only through the :class:`~rain_adapter.serve.scheduler.Scheduler` protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import APIError
from .report import ab_report
from .requests import parse_chat, parse_completion, parse_feedback, parse_json_body
from .responses import (
    Exchange,
    error_response,
    health_body,
    models_body,
    reply,
    stream_reply,
)
from .scheduler import GenJob
from .state import ServeState, serve_state_from

log = logging.getLogger("rain_adapter.serve")
router = APIRouter()  # routes return plain dicts: response_model=None keeps FastAPI from re-validating them


def _state(request: Request) -> ServeState:
    return request.app.state.rain


def _auth(request: Request) -> None:
    """401 unless the request carries this server's API key (when it has one)."""
    key = _state(request).api_key
    if not key:
        return
    h = request.headers.get("authorization", "")
    if not h:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if h != f"Bearer {key}":
        raise APIError(401, "incorrect API key provided", code="invalid_api_key")


async def _json_body(request: Request) -> dict:
    return parse_json_body(await request.body())


# ----------------------------------------------------------------------------- generation
async def _generate(request: Request, chat: bool) -> Response:
    """Validate, submit one job, and answer with JSON or an SSE stream."""
    state = _state(request)
    body = await _json_body(request)
    _auth(request)
    req = parse_chat(body, state.limits) if chat else parse_completion(body, state.limits)
    prompt_ids = req.encode(state.tokenizer)
    params = req.sampling.gen_params(len(prompt_ids), state.context_length, state.max_tokens_cap, req.prompt_param)
    arm, lam, how = state.assigner.choose(req.rain.arm, req.rain.lam, req.user)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    job = GenJob(rid, prompt_ids, lam, params, asyncio.get_running_loop(), asyncio.Queue())
    ex = Exchange(request=req, job=job, model_name=state.model_name, arm=arm, lam=lam, assignment=how,
                  created=int(time.time()), cancel=lambda: state.scheduler.cancel(job), release=state.release)
    state.submit(job)
    return stream_reply(ex, state.request_log) if req.stream else await reply(ex, state.request_log)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _generate(request, chat=True)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _generate(request, chat=False)


# ----------------------------------------------------------------------------- the rest
@router.get("/health", response_model=None)
async def health(request: Request) -> dict[str, Any]:
    state = _state(request)
    return health_body(state.model_name, state.queue_depth(), state.inflight, state.started)


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(_state(request).metrics.registry.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models", response_model=None)
async def models(request: Request) -> dict[str, Any]:
    _auth(request)
    state = _state(request)
    return models_body(state.model_name, state.started, state.lambda_range, state.arms)


@router.post("/v1/rain/feedback", response_model=None)
async def feedback(request: Request) -> dict[str, Any]:
    """Attach a score (and comment) to a logged request; 404 for an id not in the log."""
    _auth(request)
    fb = parse_feedback(await _json_body(request))
    rlog = _state(request).request_log
    if not await rlog.has_request(fb.request_id):
        raise APIError(404, f"no request with id {fb.request_id!r} in the log", param="request_id",
                       code="not_found")
    await rlog.add_feedback(fb.request_id, fb.score, fb.comment)
    return {"ok": True, "request_id": fb.request_id, "score": fb.score}


@router.get("/v1/rain/ab", response_model=None)
async def ab(request: Request) -> dict[str, Any]:
    _auth(request)
    rows = await asyncio.to_thread(_state(request).db.rows)
    return await asyncio.to_thread(ab_report, rows)


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
    """Build the FastAPI app; the scheduler starts in the lifespan and drains on shutdown."""
    app = FastAPI(title="rain-adapter", lifespan=_lifespan(state))
    app.state.rain = state
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _any_error)
    app.include_router(router)
    return app


__all__ = ["ServeState", "create_app", "serve_state_from"]
