"""Typed parsing and validation of the server's request bodies.

Every check of a client's input lives here and fails with an OpenAI-style 400 (``errors.bad_request``)
naming the offending field in ``param`` (404 for an unknown model). Parsing a body needs only the
server's :class:`RequestLimits`; what needs the tokenizer (the prompt's token count against the
context length, token-id range) happens afterwards in :meth:`ChatRequest.encode` /
:meth:`CompletionRequest.encode` and :meth:`SamplingParams.gen_params`.

Rain extensions (the ``openai`` client sends them with ``extra_body``): ``rain_lambda`` (a number in
the adapter's ``lambda_range``), ``rain_arm`` (an arm name), ``rain_checks`` (IFEval-style
instructions: a list of ``{"instruction_id", "kwargs"}`` — ``id`` is accepted for
``instruction_id`` and a bare string for an id without kwargs — or one IFEval record
``{"instruction_id_list", "kwargs"}``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..evaluation.checks import supported_ids
from .errors import APIError, bad_request
from .scheduler import GenParams

CHAT_ROLES = ("system", "user", "assistant", "developer")
MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class RequestLimits:
    """What the server allows: its model name, λ range, arm names and token cap."""

    model_name: str
    lambda_range: tuple[float, float]
    arm_names: frozenset[str]
    max_tokens_cap: int
    default_temperature: float = 1.0


@dataclass(frozen=True)
class RainCheck:
    """One ``rain_checks`` entry: an instruction id evaluation's checks can score, and its kwargs."""

    instruction_id: str
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class RainExtensions:
    """The request's rain fields; ``lam`` / ``arm`` are None when not given."""

    lam: float | None = None
    arm: str | None = None
    checks: tuple[RainCheck, ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI sampling fields; ``max_tokens`` None: as many as the context and the cap allow."""

    max_tokens: int | None
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def gen_params(self, prompt_len: int, context_length: int, cap: int, prompt_param: str) -> GenParams:
        """Generation parameters for a prompt of ``prompt_len`` tokens (400 when it does not fit)."""
        if prompt_len >= context_length:
            raise bad_request(f"the prompt has {prompt_len} tokens; this model's context length is {context_length}",
                              prompt_param, code="context_length_exceeded")
        mt = self.max_tokens if self.max_tokens is not None else min(cap, context_length - prompt_len)
        if prompt_len + mt > context_length:
            raise bad_request(f"prompt ({prompt_len} tokens) + max_tokens ({mt}) exceeds the context length "
                              f"{context_length}", "max_tokens", code="context_length_exceeded")
        return GenParams(max_tokens=mt, temperature=self.temperature, top_p=self.top_p, stop=self.stop,
                         seed=self.seed)


@dataclass(frozen=True)
class GenerationRequest:
    """The fields chat and completions requests share."""

    model: str
    sampling: SamplingParams
    rain: RainExtensions
    user: str | None
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ChatRequest(GenerationRequest):
    """``POST /v1/chat/completions``; ``messages``: ``{"role", "content"}`` with text content."""

    messages: tuple[dict[str, str], ...]

    chat = True
    prompt_param = "messages"

    def encode(self, tokenizer) -> list[int]:
        """Token ids of the conversation through the tokenizer's chat template (generation prompt added)."""
        text = tokenizer.apply_chat_template(list(self.messages), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``; ``prompt``: text or token ids."""

    prompt: str | tuple[int, ...]

    chat = False
    prompt_param = "prompt"

    def encode(self, tokenizer) -> list[int]:
        """Token ids of the prompt (400 for a token id outside the vocabulary)."""
        if isinstance(self.prompt, str):
            return list(tokenizer(self.prompt)["input_ids"])
        vocab = len(tokenizer)
        if any(t < 0 or t >= vocab for t in self.prompt):
            raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
        return list(self.prompt)


@dataclass(frozen=True)
class FeedbackRequest:
    """``POST /v1/rain/feedback``."""

    request_id: str
    score: float
    comment: str | None = None


# ----------------------------------------------------------------------------- field readers
def number_field(body: dict, name: str, default: float | None, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> float | None:
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); ``default`` when absent or null."""
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


def int_field(body: dict, name: str, default: int | None = None) -> int | None:
    """An integer (not a bool); ``default`` when absent or null."""
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
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v) or len(v) > MAX_STOP_STRINGS:
        raise bad_request("stop must be a non-empty string or a list of up to 16 non-empty strings", "stop")
    return tuple(v)


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object (400 ``invalid_json`` otherwise)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"could not parse the JSON body of the request: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the JSON body must be an object", code="invalid_json")
    return body


def _model(body: dict, limits: RequestLimits) -> str:
    m = body.get("model")
    if not isinstance(m, str) or not m:
        raise bad_request("you must provide a model parameter", "model", code="missing_required_parameter")
    if m != limits.model_name:
        raise APIError(404, f"the model {m!r} does not exist; this server serves {limits.model_name!r}",
                       param="model", code="model_not_found")
    return m


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


def _messages(body: dict) -> tuple[dict[str, str], ...]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("messages must be a non-empty list", "messages", code="missing_required_parameter")
    conv = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise bad_request(f"messages[{i}] needs a role of system|developer|user|assistant", "messages")
        role = "system" if m["role"] == "developer" else m["role"]  # chat templates know no "developer"
        conv.append({"role": role, "content": _message_text(m.get("content"), i)})
    return tuple(conv)


def _prompt(body: dict) -> str | tuple[int, ...]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return tuple(p)
    raise bad_request("prompt must be a string (or one string in a list, or a list of token ids)", "prompt")


def _sampling(body: dict, limits: RequestLimits, chat: bool) -> SamplingParams:
    mt = int_field(body, "max_completion_tokens") if chat else None  # the newer chat name wins
    if mt is None:
        mt = int_field(body, "max_tokens")
    if mt is not None and mt < 1:
        raise bad_request(f"max_tokens must be at least 1, got {mt}", "max_tokens")
    if mt is not None and mt > limits.max_tokens_cap:
        raise bad_request(f"max_tokens={mt} is over this server's cap of {limits.max_tokens_cap}", "max_tokens",
                          code="max_tokens_exceeded")
    if int_field(body, "n", 1) != 1:
        raise bad_request("only n=1 is supported", "n")
    if body.get("logprobs") not in (None, False) or body.get("echo") not in (None, False):
        raise bad_request("logprobs and echo are not supported", "logprobs")
    temperature = number_field(body, "temperature", limits.default_temperature, 0.0, 2.0)
    top_p = number_field(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = int_field(body, "seed")
    return SamplingParams(max_tokens=mt, temperature=temperature, top_p=top_p, stop=_stop(body), seed=seed)


def _arm_and_lambda(body: dict, limits: RequestLimits) -> tuple[str | None, float | None]:
    arm = body.get("rain_arm")
    if arm is not None and (not isinstance(arm, str) or arm not in limits.arm_names):
        raise bad_request(f"unknown rain_arm {arm!r}; arms: {sorted(limits.arm_names)}", "rain_arm")
    lam = body.get("rain_lambda")
    if lam is not None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
            raise bad_request(f"rain_lambda must be a number, got {lam!r}", "rain_lambda")
        lo, hi = limits.lambda_range
        if not lo <= lam <= hi:
            raise bad_request(f"rain_lambda={lam} is outside the adapter's lambda_range [{lo}, {hi}]",
                              "rain_lambda", code="lambda_out_of_range")
        lam = float(lam)
    return arm, lam


def parse_rain_checks(value: Any) -> tuple[RainCheck, ...]:
    """Validate ``rain_checks``: every id must be one evaluation's checks can score (400 otherwise)."""
    if value is None:
        return ()
    if isinstance(value, dict) and "instruction_id_list" in value:  # IFEval record layout
        ids, kws = value.get("instruction_id_list"), value.get("kwargs")
        if not isinstance(ids, list) or not isinstance(kws, (list, type(None))):
            raise bad_request("rain_checks: instruction_id_list and kwargs must be lists", "rain_checks")
        value = [{"instruction_id": i, "kwargs": k} for i, k in zip(ids, kws or [{}] * len(ids))]
    if not isinstance(value, list):
        raise bad_request("rain_checks must be a list of {instruction_id, kwargs}", "rain_checks")
    known = supported_ids()
    out = []
    for i, c in enumerate(value):
        if isinstance(c, str):
            c = {"instruction_id": c}
        if not isinstance(c, dict):
            raise bad_request(f"rain_checks[{i}] must be an object", "rain_checks")
        iid = c.get("instruction_id", c.get("id"))
        kw = c.get("kwargs") or {}
        if not isinstance(iid, str) or not isinstance(kw, dict):
            raise bad_request(f"rain_checks[{i}] needs a string instruction_id and an object kwargs", "rain_checks")
        if iid not in known:
            raise bad_request(f"rain_checks[{i}]: unknown instruction_id {iid!r}; known: {sorted(known)}",
                              "rain_checks")
        out.append(RainCheck(iid, kw))
    return tuple(out)


def _common(body: dict, limits: RequestLimits, chat: bool) -> dict[str, Any]:
    """The shared fields, validated in the order the server has always reported them."""
    sampling = _sampling(body, limits, chat)
    arm, lam = _arm_and_lambda(body, limits)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("user must be a string", "user")
    rain = RainExtensions(lam=lam, arm=arm, checks=parse_rain_checks(body.get("rain_checks")))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean", "stream")
    so = body.get("stream_options") or {}
    include_usage = bool(isinstance(so, dict) and so.get("include_usage"))
    return dict(sampling=sampling, rain=rain, user=user, stream=stream, include_usage=include_usage)


def parse_chat(body: dict, limits: RequestLimits) -> ChatRequest:
    """A validated chat completions request."""
    model = _model(body, limits)
    messages = _messages(body)
    return ChatRequest(model=model, messages=messages, **_common(body, limits, chat=True))


def parse_completion(body: dict, limits: RequestLimits) -> CompletionRequest:
    """A validated (legacy) completions request."""
    model = _model(body, limits)
    prompt = _prompt(body)
    return CompletionRequest(model=model, prompt=prompt, **_common(body, limits, chat=False))


def parse_feedback(body: dict) -> FeedbackRequest:
    """A validated feedback record."""
    rid = body.get("request_id")
    if not isinstance(rid, str) or not rid:
        raise bad_request("request_id must be a non-empty string", "request_id", code="missing_required_parameter")
    score = number_field(body, "score", None)
    if score is None:
        raise bad_request("score must be a number", "score", code="missing_required_parameter")
    comment = body.get("comment")
    if comment is not None and not isinstance(comment, str):
        raise bad_request("comment must be a string", "comment")
    return FeedbackRequest(request_id=rid, score=score, comment=comment)


__all__ = ["ChatRequest", "CompletionRequest", "FeedbackRequest", "GenerationRequest", "RainCheck",
           "RainExtensions", "RequestLimits", "SamplingParams", "int_field", "number_field", "parse_chat",
           "parse_completion", "parse_feedback", "parse_json_body", "parse_rain_checks"]
