"""The OpenAI-compatible HTTP API (FastAPI).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with
SSE streaming), ``GET /health``, ``GET /metrics`` (Prometheus text), ``POST /v1/rain/feedback``,
``GET /v1/rain/ab``.  Request extensions (the ``openai`` client sends them with ``extra_body``):
``rain_lambda`` (a number inside the adapter's ``lambda_range``), ``rain_arm`` (an arm name),
``rain_checks`` (IFEval-style instruction checks scored into the log).  Responses carry
``"rain": {"arm", "lambda", "request_id"}`` and the ``X-Rain-Arm`` / ``X-Rain-Lambda`` headers.

Durability: a request's log row is committed before its response (or, when streaming, before the
final chunk and ``[DONE]``) is sent, so every acknowledged request is in the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .arms import Arm, ArmAssigner
from .batching import BatchScheduler, GenEvent, GenJob, GenParams
from .checks import parse_rain_checks, run_checks, think_format_valid
from .errors import APIError, bad_request
from .metrics_db import MetricsDB
from .prom import ServeMetrics
from .report import ab_report

log = logging.getLogger("rain_adapter.serve")


@dataclass
class ServeState:
    """Everything a request handler needs. ``model`` is a RainModel (or a bare HF model)."""

    model: Any
    tokenizer: Any
    model_name: str
    lambda_range: tuple[float, float]
    arms: list[Arm]
    db: MetricsDB
    api_key: str | None = None
    max_tokens_cap: int = 1024
    max_batch_size: int = 8
    batch_window_ms: float = 10.0
    context_length: int | None = None
    default_temperature: float = 1.0
    batching: str = "dynamic"  # "dynamic" (batching.BatchScheduler) | "continuous" (continuous.ContinuousScheduler)
    scheduler: BatchScheduler | None = None
    metrics: ServeMetrics | None = None
    assigner: ArmAssigner | None = None
    inflight: int = 0
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        lo, hi = self.lambda_range
        for a in self.arms:
            if not lo <= a.lam <= hi:
                raise ValueError(f"arm {a.name!r}: λ={a.lam} outside the adapter's lambda_range [{lo}, {hi}]")
        self.assigner = ArmAssigner(self.arms)
        if self.context_length is None:
            cfg = getattr(self.model, "config", None)
            self.context_length = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
        self.metrics = ServeMetrics(lambda: self.scheduler.queue_depth() if self.scheduler else 0,
                                    lambda: self.inflight)


# --------------------------------------------------------------------------- validation helpers
def _number(body: dict, name: str, default: float | None, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> float | None:
    v = body.get(name, None)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad_request(f"{name} must be a finite number, got {v!r}", name)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise bad_request(f"{name}={v} is below the allowed range ({'>' if lo_open else '>='} {lo})", name)
    if hi is not None and v > hi:
        raise bad_request(f"{name}={v} is above the allowed maximum {hi}", name)
    return float(v)


def _int(body: dict, name: str, default: int | None = None) -> int | None:
    v = body.get(name, None)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_request(f"{name} must be an integer, got {v!r}", name)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v) or len(v) > 16:
        raise bad_request("stop must be a non-empty string or a list of up to 16 non-empty strings", "stop")
    return tuple(v)


def _message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}]
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
            parts.append(p["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise bad_request(f"messages[{i}].content must be a string or a list of text parts", "messages")


# --------------------------------------------------------------------------------- the app
def create_app(state: ServeState) -> FastAPI:
    """Build the FastAPI app; the scheduler starts in the lifespan and drains on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.scheduler is None:
            sched_cls = BatchScheduler
            if state.batching == "continuous":
                from .continuous import ContinuousScheduler as sched_cls
            elif state.batching != "dynamic":
                raise ValueError(f"rain_adapter.serve.app: batching must be 'dynamic' or 'continuous', got {state.batching!r}")
            state.scheduler = sched_cls(state.model, state.tokenizer, max_batch_size=state.max_batch_size,
                                        batch_window_ms=state.batch_window_ms, on_batch=state.metrics.on_batch)
        try:
            yield
        finally:
            # uvicorn has already waited for in-flight HTTP requests; drain anything still queued.
            await asyncio.to_thread(state.scheduler.shutdown)
            state.db.close()
            log.info("rain serve: scheduler drained, request log flushed")

    app = FastAPI(title="rain-adapter", lifespan=lifespan)
    app.state.rain = state

    def err_response(e: APIError) -> JSONResponse:
        state.metrics.errors.inc(str(e.status))
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return err_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return err_response(APIError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(Exception)
    async def _any_error(request: Request, e: Exception):
        log.exception("rain serve: unhandled error")
        return err_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error",
                                     code="internal_error"))

    def auth(request: Request) -> None:
        if not state.api_key:
            return
        h = request.headers.get("authorization", "")
        if not h:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if h != f"Bearer {state.api_key}":
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    async def json_body(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"could not parse the JSON body of the request: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the JSON body must be an object", code="invalid_json")
        return body

    def check_model(body: dict) -> None:
        m = body.get("model")
        if not isinstance(m, str) or not m:
            raise bad_request("you must provide a model parameter", "model", code="missing_required_parameter")
        if m != state.model_name:
            raise APIError(404, f"the model {m!r} does not exist; this server serves {state.model_name!r}",
                           param="model", code="model_not_found")

    def resolve_arm(body: dict) -> tuple[str, float, str]:
        """(arm name, λ, how it was chosen)."""
        lo, hi = state.lambda_range
        arm_name = body.get("rain_arm")
        if arm_name is not None and (not isinstance(arm_name, str) or arm_name not in state.assigner.by_name):
            raise bad_request(f"unknown rain_arm {arm_name!r}; arms: {sorted(state.assigner.by_name)}", "rain_arm")
        if body.get("rain_lambda") is not None:
            v = body["rain_lambda"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad_request(f"rain_lambda must be a number, got {v!r}", "rain_lambda")
            if not lo <= v <= hi:
                raise bad_request(f"rain_lambda={v} is outside the adapter's lambda_range [{lo}, {hi}]",
                                  "rain_lambda", code="lambda_out_of_range")
            return (arm_name or "custom"), float(v), "explicit_lambda"
        if arm_name is not None:
            return arm_name, state.assigner.by_name[arm_name].lam, "explicit_arm"
        user = body.get("user")
        if user is not None and not isinstance(user, str):
            raise bad_request("user must be a string", "user")
        arm, how = state.assigner.assign(user)
        return arm.name, arm.lam, how

    def gen_params(body: dict, prompt_len: int, chat: bool) -> GenParams:
        ctx = state.context_length
        if prompt_len >= ctx:
            raise bad_request(f"the prompt has {prompt_len} tokens; this model's context length is {ctx}",
                              "messages" if chat else "prompt", code="context_length_exceeded")
        mt = _int(body, "max_completion_tokens") if chat else None
        if mt is None:
            mt = _int(body, "max_tokens")
        if mt is None:
            mt = min(state.max_tokens_cap, ctx - prompt_len)
        if mt < 1:
            raise bad_request(f"max_tokens must be at least 1, got {mt}", "max_tokens")
        if mt > state.max_tokens_cap:
            raise bad_request(f"max_tokens={mt} is over this server's cap of {state.max_tokens_cap}", "max_tokens",
                              code="max_tokens_exceeded")
        if prompt_len + mt > ctx:
            raise bad_request(f"prompt ({prompt_len} tokens) + max_tokens ({mt}) exceeds the context length {ctx}",
                              "max_tokens", code="context_length_exceeded")
        n = _int(body, "n", 1)
        if n != 1:
            raise bad_request("only n=1 is supported", "n")
        if body.get("logprobs") not in (None, False) or body.get("echo") not in (None, False):
            raise bad_request("logprobs and echo are not supported", "logprobs")
        temperature = _number(body, "temperature", state.default_temperature, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
        seed = _int(body, "seed")
        return GenParams(max_tokens=mt, temperature=temperature, top_p=top_p, stop=_stop(body), seed=seed)

    def encode_chat(body: dict) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise bad_request("messages must be a non-empty list", "messages", code="missing_required_parameter")
        conv = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
                raise bad_request(f"messages[{i}] needs a role of system|developer|user|assistant", "messages")
            role = "system" if m["role"] == "developer" else m["role"]
            conv.append({"role": role, "content": _message_text(m.get("content"), i)})
        text = state.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        return list(state.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(body: dict) -> list[int]:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, str):
            return list(state.tokenizer(p)["input_ids"])
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            vocab = len(state.tokenizer)
            if any(t < 0 or t >= vocab for t in p):
                raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
            return list(p)
        raise bad_request("prompt must be a string (or one string in a list, or a list of token ids)", "prompt")

    # ----------------------------------------------------------------------- generation core
    async def generate(request: Request, body: dict, chat: bool):
        auth(request)
        check_model(body)
        prompt_ids = encode_chat(body) if chat else encode_prompt(body)
        params = gen_params(body, len(prompt_ids), chat)
        arm, lam, how = resolve_arm(body)
        checks = parse_rain_checks(body.get("rain_checks"))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad_request("stream must be a boolean", "stream")
        so = body.get("stream_options") or {}
        include_usage = bool(isinstance(so, dict) and so.get("include_usage"))

        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        loop = asyncio.get_running_loop()
        job = GenJob(rid, prompt_ids, lam, params, loop, asyncio.Queue())
        t0 = job.t_arrival
        rain = {"arm": arm, "lambda": lam, "request_id": rid}
        headers = {"X-Rain-Arm": arm, "X-Rain-Lambda": repr(lam), "X-Request-Id": rid}
        endpoint = "chat" if chat else "completions"
        base_row = dict(id=rid, endpoint=endpoint, model=state.model_name, user=body.get("user"), arm=arm, lam=lam,
                        assignment=how, stream=stream, prompt_tokens=len(prompt_ids))

        def finish_row(text: str, done: GenEvent | None, status: str) -> dict:
            ok_, results = run_checks(checks, text) if status == "ok" else (None, [])
            ttft = (job.t_first_token - t0) if job.t_first_token is not None else None
            return dict(base_row, completion_tokens=done.completion_tokens if done else 0,
                        latency_s=time.perf_counter() - t0, ttft_s=ttft,
                        finish_reason=done.finish_reason if done else None,
                        format_valid=think_format_valid(text) if status == "ok" else None,
                        compliant=ok_, checks_json=results or None, batch_size=job.batch_size, status=status)

        async def commit(row: dict) -> None:
            await asyncio.to_thread(state.db.log_request, row)
            m = state.metrics
            with m.registry.lock:
                m.requests.inc(endpoint, arm, row["status"])
                if row["status"] == "ok":
                    m.prompt_tokens.inc(arm, by=row["prompt_tokens"])
                    m.completion_tokens.inc(arm, by=row["completion_tokens"])
                    m.latency.observe(row["latency_s"], arm)
                    if row["ttft_s"] is not None:
                        m.ttft.observe(row["ttft_s"], arm)

        def usage(n_out: int) -> dict:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n_out,
                    "total_tokens": len(prompt_ids) + n_out}

        state.inflight += 1
        try:
            state.scheduler.submit(job)
        except RuntimeError as e:
            state.inflight -= 1
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None

        if not stream:
            try:
                parts: list[str] = []
                while True:
                    ev: GenEvent = await job.events.get()
                    if ev.kind == "delta":
                        parts.append(ev.text)
                    elif ev.kind == "error":
                        await commit(finish_row("".join(parts), None, "error"))
                        raise APIError(500, f"generation failed: {ev.error}", type="server_error",
                                       code="generation_failed")
                    else:
                        break
                text = "".join(parts)
                row = finish_row(text, ev, "ok")
                await commit(row)  # durable BEFORE the response is sent
            except asyncio.CancelledError:
                job.cancelled = True
                raise
            finally:
                state.inflight -= 1
            fr = ev.finish_reason
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": fr,
                          "logprobs": None}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "finish_reason": fr, "logprobs": None}
                obj = "text_completion"
            out = {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": [choice],
                   "usage": usage(ev.completion_tokens), "rain": {**rain, "format_valid": row["format_valid"],
                                                                  "compliant": row["compliant"]}}
            return JSONResponse(out, headers=headers)

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_text: str | None, fr: str | None, first: bool = False, usage_: dict | None = None,
                  empty_choices: bool = False) -> str:
            if empty_choices:
                choices = []
            elif chat:
                delta: dict = {}
                if first:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choices = [{"index": 0, "delta": delta, "finish_reason": fr, "logprobs": None}]
            else:
                choices = [{"index": 0, "text": delta_text or "", "finish_reason": fr, "logprobs": None}]
            d = {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": choices,
                 "rain": rain}
            if usage_ is not None or include_usage:
                d["usage"] = usage_
            return f"data: {json.dumps(d)}\n\n"

        async def sse() -> AsyncIterator[str]:
            parts: list[str] = []
            logged = False
            try:
                if chat:
                    yield chunk("", None, first=True)
                while True:
                    ev = await job.events.get()
                    if ev.kind == "delta":
                        parts.append(ev.text)
                        yield chunk(ev.text, None)
                    elif ev.kind == "error":
                        await commit(finish_row("".join(parts), None, "error"))
                        logged = True
                        err = APIError(500, f"generation failed: {ev.error}", type="server_error",
                                       code="generation_failed")
                        yield f"data: {json.dumps(err.body())}\n\n"
                        return
                    else:
                        break
                await commit(finish_row("".join(parts), ev, "ok"))  # durable BEFORE the end is acknowledged
                logged = True
                yield chunk(None if chat else "", ev.finish_reason)
                if include_usage:
                    yield chunk(None, None, usage_=usage(ev.completion_tokens), empty_choices=True)
                yield "data: [DONE]\n\n"
            finally:
                if not logged:  # client went away mid-stream
                    job.cancelled = True
                    try:
                        state.db.log_request(finish_row("".join(parts), None, "cancelled"))
                    except Exception:  # noqa: BLE001
                        log.exception("rain serve: could not log a cancelled request")
                state.inflight -= 1

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})

    # ------------------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        sch = state.scheduler
        return {"status": "ok", "model": state.model_name, "queue_depth": sch.queue_depth() if sch else 0,
                "in_flight": state.inflight, "uptime_s": time.time() - state.started}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.registry.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        lo, hi = state.lambda_range
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "rain-adapter",
            "rain": {"lambda_range": [lo, hi], "arms": [{"name": a.name, "lambda": a.lam, "weight": a.weight}
                                                        for a in state.arms]}}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, await json_body(request), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, await json_body(request), chat=False)

    @app.post("/v1/rain/feedback")
    async def feedback(request: Request):
        auth(request)
        body = await json_body(request)
        rid = body.get("request_id")
        if not isinstance(rid, str) or not rid:
            raise bad_request("request_id must be a non-empty string", "request_id", code="missing_required_parameter")
        score = _number(body, "score", None)
        if score is None:
            raise bad_request("score must be a number", "score", code="missing_required_parameter")
        comment = body.get("comment")
        if comment is not None and not isinstance(comment, str):
            raise bad_request("comment must be a string", "comment")
        if not await asyncio.to_thread(state.db.has_request, rid):
            raise APIError(404, f"no request with id {rid!r} in the log", param="request_id", code="not_found")
        await asyncio.to_thread(state.db.add_feedback, rid, score, comment)
        with state.metrics.registry.lock:
            state.metrics.feedback.inc()
        return {"ok": True, "request_id": rid, "score": score}

    @app.get("/v1/rain/ab")
    async def ab(request: Request):
        auth(request)
        rows = await asyncio.to_thread(state.db.rows)
        return await asyncio.to_thread(ab_report, rows)

    return app


def serve_state_from(model, tokenizer, *, model_name: str, db_path, arms: list[Arm] | None = None,
                     lam: float | None = None, **kw) -> ServeState:
    """A :class:`ServeState` for a RainModel: λ range from its config; one arm "default" when no arms."""
    cfg = getattr(model, "rain_config", None)
    lo, hi = (tuple(cfg.lambda_range) if cfg is not None else (0.0, 0.0))
    if not arms:
        default = lam if lam is not None else (cfg.default_lambda if cfg is not None else 0.0)
        arms = [Arm("default", float(default), 1.0)]
    return ServeState(model=model, tokenizer=tokenizer, model_name=model_name, lambda_range=(float(lo), float(hi)),
                      arms=arms, db=MetricsDB(db_path), **kw)


__all__ = ["ServeState", "create_app", "serve_state_from"]
