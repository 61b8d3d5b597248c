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
``{"instruction_id_list", "kwargs"}``), with ids the server's check registry knows (built-in, ``spec:*``,
``rain serve --checks`` modules; a request never imports) and their ``spec:*`` / plug-in kwargs valid;
``rain_reasoning_parser`` (chat only: ``deepseek_r1`` or ``none``, default ``rain serve
--reasoning-parser``; :mod:`~rain_adapter.serve.reasoning`).

Which fields are honoured and which are refused with a 400 is declared once, in
:mod:`~rain_adapter.serve.field_policy` (:func:`~rain_adapter.serve.field_policy.check_fields` runs
first); the honoured decode-side ones (``include_stop_str_in_output``, ``skip_special_tokens``,
``truncate_prompt_tokens``, ``prompt_logprobs``, ``add_special_tokens``, the chat template's
``add_generation_prompt`` / ``continue_final_message``, chat ``echo``, ``include_reasoning``,
``return_tokens_as_token_ids``, ``stream_options.continuous_usage_stats``) are parsed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..evaluation.registry import CheckRegistry
from ..evaluation.specs import SpecError
from ..format.config import is_finite_number
from .errors import APIError, bad_request
from .field_policy import CHAT, COMPLETIONS, check_fields, flag
from .feedback import FeedbackRequest, parse_feedback  # noqa: F401  (re-exported)
from .fields import int_field, number_field, text_field
from .inputs import read_messages, read_prompts
from .limits import parse_json_body  # noqa: F401  (re-exported: the request parsers' entry point)
from .limits import (MAX_CHOICES, MAX_N, MAX_RAIN_CHECKS, MAX_STOP_CHARS,
                     MAX_STOP_STRINGS, MAX_USER_CHARS)
from .logprobs import parse_logprobs, parse_prompt_logprobs
from .sampling import parse_logits_spec
from .scheduler import GenParams
from .scoring import DEFAULT_SERVER_REGISTRY
from .templates import TemplateLimits, TemplateRefused, render_chat, template_options

#: the seeds a request may give (vLLM's: a signed 64-bit integer)
SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)
#: ``rain serve --reasoning-parser`` / ``rain_reasoning_parser``: split the thinking into
#: ``reasoning_content`` (vLLM's ``deepseek_r1``) or leave it in ``content`` (``none``)
REASONING_PARSERS = ("deepseek_r1", "none")


@dataclass(frozen=True)
class RequestLimits:
    """What the server allows: its model name, λ range, arm names and token cap."""

    model_name: str
    lambda_range: tuple[float, float]
    arm_names: frozenset[str]
    max_tokens_cap: int
    default_temperature: float = 1.0
    check_registry: CheckRegistry | None = None     # None: scoring.DEFAULT_SERVER_REGISTRY
    reasoning_parser: str = "deepseek_r1"           # a chat request's default (REASONING_PARSERS)
    trust_request_chat_template: bool = False       # --trust-request-chat-template: a request may bring one
    vocab_size: int | None = None                   # logits width: logit_bias / allowed_token_ids ids below it
    lambda_grid: tuple[float, ...] | None = None    # --lambda-grid: the only λ served (None: any in the range)


@dataclass(frozen=True)
class RainCheck:
    """One ``rain_checks`` entry: a known check id, its kwargs, and the registry that validated (and scores) it."""

    instruction_id: str
    kwargs: dict[str, Any]
    registry: CheckRegistry | None = field(default=None, compare=False, repr=False)


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
    processing: Any = None          # sampling.LogitsSpec or None
    logprobs: int | None = None     # top alternatives per token; None: no logprobs
    echo: bool = False              # completions: the prompt is part of the answer (with its logprobs)
    n: int = 1                      # choices per prompt (serve/choices.py)
    prompt_top: int | None = None   # ``prompt_logprobs``: k alternatives per prompt token; None: not asked
    include_stop_str: bool = False  # ``include_stop_str_in_output``
    skip_special: bool | None = None  # ``skip_special_tokens`` (None: absent; :func:`skip_ids` resolves it)
    truncate: int | None = None     # ``truncate_prompt_tokens``: keep the last k prompt tokens (-1: context length)
    as_token_ids: bool = False      # ``return_tokens_as_token_ids``

    def gen_params(self, prompt_len: int, context_length: int, cap: int, prompt_param: str,
                   skip: frozenset[int] | None = None) -> GenParams:
        """Generation parameters for a prompt of ``prompt_len`` tokens (400 when it does not fit);
        ``skip``: the ids the text leaves out (:func:`skip_ids` of ``skip_special``; None: the scheduler's)."""
        if prompt_len >= context_length:
            raise bad_request(f"the prompt has {prompt_len} tokens; this model's context length is {context_length}",
                              prompt_param, code="context_length_exceeded")
        mt = self.max_tokens if self.max_tokens is not None else min(cap, context_length - prompt_len)
        if prompt_len + mt > context_length:
            raise bad_request(f"prompt ({prompt_len} tokens) + max_tokens ({mt}) exceeds the context length "
                              f"{context_length}", "max_tokens", code="context_length_exceeded")
        return GenParams(max_tokens=mt, temperature=self.temperature, top_p=self.top_p, stop=self.stop,
                         seed=self.seed, processing=self.processing, logprobs=self.logprobs,
                         prompt_logprobs=(self.echo and self.logprobs is not None) or self.prompt_top is not None,
                         prompt_top=self.prompt_top or 0, include_stop_str=self.include_stop_str,
                         skip_ids=skip)

    def truncated(self, ids: list[int], context_length: int) -> list[int]:
        """``ids`` cut to their last ``truncate`` tokens (-1: the context length); unchanged without it."""
        if self.truncate is None:
            return ids
        k = context_length if self.truncate == -1 else self.truncate
        return ids[-k:]


@dataclass(frozen=True)
class GenerationRequest:
    """The fields chat and completions requests share."""

    model: str
    sampling: SamplingParams
    rain: RainExtensions
    user: str | None
    stream: bool
    include_usage: bool
    # keyword-only: the subclasses' own fields (no defaults) follow
    continuous_usage: bool = field(default=False, kw_only=True)   # stream_options.continuous_usage_stats
    add_special_tokens: bool | None = field(default=None, kw_only=True)   # None: chat false, completions true


@dataclass(frozen=True)
class ChatRequest(GenerationRequest):
    """``POST /v1/chat/completions``; ``messages``: ``{"role", "content"}`` with text content."""

    messages: tuple[dict[str, str], ...]
    template_kwargs: tuple[tuple[str, Any], ...] = ()   # ``chat_template_kwargs`` (less ``chat_template``)
    chat_template: str | None = None                    # the request's own (--trust-request-chat-template)
    reasoning_parser: str = "deepseek_r1"               # REASONING_PARSERS: thinking in reasoning_content or not
    add_generation_prompt: bool = True                  # the template's generation prompt
    continue_final_message: bool = False                # the final message left open: the model continues it
    include_reasoning: bool = True                      # False: no reasoning_content in the response
    echo: bool = False                                  # the last message, when the assistant's, starts the content

    chat = True
    prompt_param = "messages"

    def texts(self) -> list[str]:
        return [m["content"] for m in self.messages]

    def encode(self, tokenizer, template_limits: TemplateLimits | None = None) -> list[int]:
        """Token ids of the conversation through the chat template (generation prompt added), rendered
        in the bounded sandbox (:mod:`~rain_adapter.serve.templates`); a template that fails or runs
        over ``template_limits`` is a 400."""
        kw = {"add_generation_prompt": self.add_generation_prompt, **dict(self.template_kwargs)}
        if self.continue_final_message:
            kw["continue_final_message"] = True
        try:
            text = render_chat(tokenizer, list(self.messages), template_limits or TemplateLimits(),
                               chat_template=self.chat_template, **kw)
        except TemplateRefused as e:
            param = "chat_template" if self.chat_template else "chat_template_kwargs" if self.template_kwargs \
                else "messages"
            raise bad_request(str(e), param, code="chat_template_failed") from None
        special = bool(self.add_special_tokens)
        return _non_empty(list(tokenizer(text, add_special_tokens=special)["input_ids"]), "messages")

    def echo_text(self) -> str | None:
        """What ``echo`` prepends to the content: the last message when it is the assistant's (vLLM's rule)."""
        last = self.messages[-1]
        return last["content"] if self.echo and last["role"] == "assistant" else None


@dataclass(frozen=True)
class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``; ``prompt``: text or token ids (the first one when there are several).

    ``prompts``: every prompt of a request with a list of two or more (``["a", "b"]``,
    ``[[ids], [ids]]``), else empty; :meth:`split` gives one single-prompt request per prompt.
    """

    prompt: str | tuple[int, ...]
    prompts: tuple[str | tuple[int, ...], ...] = ()

    chat = False
    prompt_param = "prompt"

    def texts(self) -> list[str]:
        return [p for p in (self.prompts or (self.prompt,)) if isinstance(p, str)]

    def split(self) -> list["CompletionRequest"]:
        """One request per prompt (itself when it has one), in order."""
        return [replace(self, prompt=p, prompts=()) for p in self.prompts] if self.prompts else [self]

    def encode(self, tokenizer, template_limits: TemplateLimits | None = None) -> list[int]:
        """Token ids of the prompt (400 for a token id outside the vocabulary or an empty prompt)."""
        if isinstance(self.prompt, str):
            special = True if self.add_special_tokens is None else self.add_special_tokens
            return _non_empty(list(tokenizer(self.prompt, add_special_tokens=special)["input_ids"]), "prompt")
        vocab = len(tokenizer)
        if any(t < 0 or t >= vocab for t in self.prompt):
            raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
        return _non_empty(list(self.prompt), "prompt")


def _non_empty(ids: list[int], param: str) -> list[int]:
    if not ids:
        raise bad_request(f"the {param} is empty: it has no tokens", param, code="empty_prompt")
    return ids


# ----------------------------------------------------------------------------- field readers
# (the generic ones, number_field / int_field / text_field, are in .fields)
def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v) or len(v) > MAX_STOP_STRINGS:
        raise bad_request(f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS} non-empty "
                          "strings", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in v):
        raise bad_request(f"each stop string may have at most {MAX_STOP_CHARS} characters", "stop")
    return tuple(v)


def skip_ids(tokenizer, value: bool | None, keep: tuple[str, ...]) -> frozenset[int] | None:
    """The ids ``skip_special_tokens`` leaves out of the text: every special id but those of ``keep``
    (the thinking markers) for true, none for false, None (the scheduler's pad / BOS / EOS) when absent."""
    if value is None:
        return None
    if not value:
        return frozenset()
    kept = {tokenizer.convert_tokens_to_ids(t) for t in keep}
    return frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", []) if i not in kept)


def _truncate(body: dict) -> int | None:
    k = int_field(body, "truncate_prompt_tokens")
    if k is not None and k < 1 and k != -1:
        raise bad_request(f"truncate_prompt_tokens must be at least 1 (or -1: the context length), got {k}",
                          "truncate_prompt_tokens")
    return k


def _model(body: dict, limits: RequestLimits) -> str:
    m = body.get("model")
    if not isinstance(m, str) or not m:
        raise bad_request("you must provide a model parameter", "model", code="missing_required_parameter")
    if m != limits.model_name:
        raise APIError(404, f"the model {m!r} does not exist; this server serves {limits.model_name!r}",
                       param="model", code="model_not_found")
    return m


def _sampling(body: dict, limits: RequestLimits, chat: bool) -> SamplingParams:
    mt = int_field(body, "max_completion_tokens") if chat else None  # the newer chat name wins
    if mt is None:
        mt = int_field(body, "max_tokens")
    if mt is not None and mt < 1:
        raise bad_request(f"max_tokens must be at least 1, got {mt}", "max_tokens")
    if mt is not None and mt > limits.max_tokens_cap:
        raise bad_request(f"max_tokens={mt} is over this server's cap of {limits.max_tokens_cap}", "max_tokens",
                          code="max_tokens_exceeded")
    n = int_field(body, "n", 1)
    if not 1 <= n <= MAX_N:
        raise bad_request(f"n must be between 1 and {MAX_N}, got {n}", "n")
    logprobs, echo = parse_logprobs(body, chat)
    processing = parse_logits_spec(body, mt, limits.vocab_size)
    temperature = number_field(body, "temperature", limits.default_temperature, 0.0, 2.0)
    top_p = number_field(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = int_field(body, "seed")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise bad_request(f"seed must be a signed 64-bit integer (between -2^63 and 2^63 - 1), got {seed}", "seed")
    prompt_top = parse_prompt_logprobs(body, bool(body.get("stream")))
    include_stop = flag(body, "include_stop_str_in_output", False)
    skip = body.get("skip_special_tokens")
    if skip is not None and not isinstance(skip, bool):
        raise bad_request(f"skip_special_tokens must be a boolean, got {skip!r}", "skip_special_tokens")
    flag(body, "spaces_between_special_tokens", True)   # fast tokenizers put no spaces there either way
    as_ids = flag(body, "return_tokens_as_token_ids", False)
    return SamplingParams(max_tokens=mt, temperature=temperature, top_p=top_p, stop=_stop(body), seed=seed,
                          processing=processing, logprobs=logprobs, echo=echo, n=n, prompt_top=prompt_top,
                          include_stop_str=include_stop, skip_special=skip, truncate=_truncate(body),
                          as_token_ids=as_ids)


def _arm_and_lambda(body: dict, limits: RequestLimits) -> tuple[str | None, float | None]:
    arm = body.get("rain_arm")
    if arm is not None and body.get("rain_lambda") is not None:
        raise bad_request("give rain_arm or rain_lambda, not both (an arm has its own λ)", "rain_arm")
    if arm is not None and (not isinstance(arm, str) or arm not in limits.arm_names):
        raise bad_request(f"unknown rain_arm {arm!r}; arms: {sorted(limits.arm_names)}", "rain_arm")
    lam = body.get("rain_lambda")
    if lam is not None:
        if not is_finite_number(lam):
            raise bad_request(f"rain_lambda must be a number, got {lam!r}", "rain_lambda")
        lo, hi = limits.lambda_range
        if not lo <= lam <= hi:
            raise bad_request(f"rain_lambda={lam} is outside the adapter's lambda_range [{lo}, {hi}]",
                              "rain_lambda", code="lambda_out_of_range")
        lam = float(lam)
        if limits.lambda_grid is not None:
            lam = on_grid(lam, limits.lambda_grid)
    return arm, lam


#: how far a requested λ may be from a grid value and still be that value (JSON float round-off only)
GRID_TOL = 1e-9


def on_grid(lam: float, grid: tuple[float, ...]) -> float:
    """The grid value ``lam`` names (within :data:`GRID_TOL`); anything else is a 400 listing the grid
    (never a snap to the nearest value)."""
    for g in grid:
        if abs(lam - g) <= GRID_TOL:
            return float(g)
    raise bad_request(f"rain_lambda={lam:g} is not served: this server serves the λ grid "
                      f"[{', '.join(f'{g:g}' for g in grid)}] (--lambda-grid)", "rain_lambda",
                      code="lambda_not_served")


def parse_rain_checks(value: Any, registry: CheckRegistry | None = None) -> tuple[RainCheck, ...]:
    """Validate ``rain_checks``: every id must be one ``registry`` (default: the server's default,
    built-in and ``spec:*`` ids) knows without importing, with valid ``spec:*`` kwargs (400 otherwise)."""
    registry = registry or DEFAULT_SERVER_REGISTRY
    if value is None:
        return ()
    if isinstance(value, dict) and "instruction_id_list" in value:  # IFEval record layout
        ids, kws = value.get("instruction_id_list"), value.get("kwargs")
        if not isinstance(ids, list) or not isinstance(kws, (list, type(None))):
            raise bad_request("rain_checks: instruction_id_list and kwargs must be lists", "rain_checks")
        value = [{"instruction_id": i, "kwargs": k} for i, k in zip(ids, kws or [{}] * len(ids))]
    if not isinstance(value, list):
        raise bad_request("rain_checks must be a list of {instruction_id, kwargs}", "rain_checks")
    if len(value) > MAX_RAIN_CHECKS:  # each regex search may run TIMEOUT_S: bound the request's total
        raise bad_request(f"at most {MAX_RAIN_CHECKS} rain_checks per request, got {len(value)}", "rain_checks")
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
        if not registry.known(iid):
            raise bad_request(f"rain_checks[{i}]: unknown instruction_id {iid!r}; known: "
                              f"{sorted(registry.known_ids())}", "rain_checks")
        try:
            registry.validate(iid, kw)
        except SpecError as e:
            raise bad_request(f"rain_checks[{i}]: {iid}: kwargs.{e.field}: {e.message}", "rain_checks") from None
        out.append(RainCheck(iid, kw, registry))
    return tuple(out)


def _identifiers(body: dict) -> None:
    """The hints that promise no effect (``prompt_cache_key``, ``safety_identifier``, ``cache_salt``):
    strings, type-checked."""
    for name in ("prompt_cache_key", "safety_identifier"):
        text_field(body, name, MAX_USER_CHARS)
    if body.get("prompt_cache_retention") not in (None, "in_memory", "24h"):
        raise bad_request("prompt_cache_retention must be 'in_memory' or '24h'", "prompt_cache_retention")
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise bad_request("cache_salt must be a non-empty string", "cache_salt")
    if salt is not None:
        text_field(body, "cache_salt", MAX_USER_CHARS)
    if body.get("parallel_tool_calls") is not None:
        flag(body, "parallel_tool_calls", False)


def _common(body: dict, limits: RequestLimits, chat: bool) -> dict[str, Any]:
    """The shared fields, validated in the order the server has always reported them."""
    sampling = _sampling(body, limits, chat)
    arm, lam = _arm_and_lambda(body, limits)
    user = text_field(body, "user", MAX_USER_CHARS)
    rain = RainExtensions(lam=lam, arm=arm, checks=parse_rain_checks(body.get("rain_checks"), limits.check_registry))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean", "stream")
    so = body.get("stream_options") or {}
    include_usage = bool(isinstance(so, dict) and so.get("include_usage"))
    continuous = bool(isinstance(so, dict) and so.get("continuous_usage_stats"))
    _identifiers(body)
    special = body.get("add_special_tokens")
    if special is not None:
        special = flag(body, "add_special_tokens", False)
    return dict(sampling=sampling, rain=rain, user=user, stream=stream, include_usage=include_usage,
                continuous_usage=continuous, add_special_tokens=special)


def parse_chat(body: dict, limits: RequestLimits) -> ChatRequest:
    """A validated chat completions request."""
    model = _model(body, limits)
    check_fields(body, CHAT)
    messages = read_messages(body)
    template_kwargs, template = template_options(body, limits.trust_request_chat_template)
    rp = body.get("rain_reasoning_parser", limits.reasoning_parser)
    if rp not in REASONING_PARSERS:
        raise bad_request(f"rain_reasoning_parser must be one of {list(REASONING_PARSERS)}, got {rp!r}",
                          "rain_reasoning_parser")
    continue_final = flag(body, "continue_final_message", False)
    agp = flag(body, "add_generation_prompt", not continue_final)
    if continue_final and agp:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be true",
                          "continue_final_message")
    return ChatRequest(model=model, messages=messages, template_kwargs=template_kwargs, chat_template=template,
                       reasoning_parser=rp, add_generation_prompt=agp, continue_final_message=continue_final,
                       include_reasoning=flag(body, "include_reasoning", True), echo=flag(body, "echo", False),
                       **_common(body, limits, chat=True))


def parse_completion(body: dict, limits: RequestLimits) -> CompletionRequest:
    """A validated (legacy) completions request."""
    model = _model(body, limits)
    check_fields(body, COMPLETIONS)
    if body.get("rain_reasoning_parser") is not None:
        raise bad_request("rain_reasoning_parser applies to /v1/chat/completions only", "rain_reasoning_parser")
    prompts = read_prompts(body)
    common = _common(body, limits, chat=False)
    if len(prompts) * common["sampling"].n > MAX_CHOICES:
        raise bad_request(f"n × the number of prompts is {len(prompts) * common['sampling'].n}; at most "
                          f"{MAX_CHOICES} choices per request", "n", code="too_many_choices")
    return CompletionRequest(model=model, prompt=prompts[0], prompts=prompts if len(prompts) > 1 else (),
                             **common)


__all__ = ["REASONING_PARSERS", "skip_ids", "ChatRequest", "CompletionRequest", "FeedbackRequest", "GenerationRequest",
           "RainCheck", "RainExtensions", "RequestLimits", "SamplingParams", "parse_chat", "parse_completion",
           "parse_feedback", "parse_json_body", "parse_rain_checks"]
