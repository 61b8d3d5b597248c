"""Every request field ``rain serve`` knows, declared once: HONOURED or REFUSED (issue 22, 5).

A field the OpenAI or vLLM chat-completions / completions schemas define is in exactly one of
:data:`HONOURED` (the server does what the field asks; :mod:`~rain_adapter.serve.requests` and the
modules it calls parse it) or :data:`REFUSED` (a 400 naming the field whenever it carries anything but
one of its inert values — a default that asks for nothing, e.g. ``use_beam_search: false``). There is
no third state: ``tests/test_serve_fields.py`` walks the schemas' field lists
(``tests/data/serve_request_fields.json``) against these two tables, sends every refused field with a
non-default value, and checks that each honoured field has a test of its effect.

A field given to an endpoint it does not belong to (``messages`` aside, which the parsers require)
is a 400 naming it too (``echo`` is on both; ``add_generation_prompt`` only on chat...). Sub-fields
of ``stream_options`` are named ``stream_options.<key>``. Fields no schema defines are not looked at
(vLLM ignores them as well).

Shapes: each table maps a field name to a :class:`FieldRule`; :func:`check_fields` applies them to a
parsed JSON body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import bad_request

CHAT, COMPLETIONS = "chat", "completions"
BOTH = frozenset({CHAT, COMPLETIONS})
_CHAT = frozenset({CHAT})
_COMPLETIONS = frozenset({COMPLETIONS})


@dataclass(frozen=True)
class FieldRule:
    """``what``: what the server does with the field (HONOURED) or why it refuses it (REFUSED);
    ``endpoints``: where it may be sent; ``inert``: the values a REFUSED field may take (its
    defaults, which ask for nothing)."""

    what: str
    endpoints: frozenset[str] = BOTH
    inert: tuple[Any, ...] = (None,)


def _h(what: str, endpoints: frozenset[str] = BOTH) -> FieldRule:
    return FieldRule(what, endpoints)


def _r(what: str, *inert: Any, endpoints: frozenset[str] = BOTH) -> FieldRule:
    return FieldRule(what, endpoints, (None, *inert))


#: the fields the server does what they ask (parsed in serve/requests.py, sampling.py, logprobs.py, templates.py)
HONOURED: dict[str, FieldRule] = {
    "model": _h("must be the served model's name (404 otherwise)"),
    "messages": _h("the conversation, rendered with the chat template", _CHAT),
    "prompt": _h("text, token ids, or a list of either (one choice set per prompt)", _COMPLETIONS),
    "max_tokens": _h("the generation's cap (≤ rain serve --max-tokens-cap)"),
    "max_completion_tokens": _h("chat's newer name for max_tokens (wins over it)", _CHAT),
    "temperature": _h("sampling temperature in [0, 2]; 0 is greedy"),
    "top_p": _h("nucleus sampling in (0, 1]"),
    "top_k": _h("keep the k most likely tokens (-1 / 0: off)"),
    "min_p": _h("drop tokens below min_p × the most likely one's probability"),
    "n": _h("choices per prompt (≤ 16)"),
    "seed": _h("reproducible sampling (a signed 64-bit integer)"),
    "stop": _h("stop strings (not in the text unless include_stop_str_in_output)"),
    "stop_token_ids": _h("token ids that end the choice"),
    "include_stop_str_in_output": _h("the matched stop string stays at the end of the text"),
    "ignore_eos": _h("EOS is never produced"),
    "min_tokens": _h("EOS is not produced before min_tokens tokens"),
    "frequency_penalty": _h("OpenAI's frequency penalty"),
    "presence_penalty": _h("OpenAI's presence penalty"),
    "repetition_penalty": _h("vLLM's / transformers' repetition penalty"),
    "logit_bias": _h("{token id: bias in [-100, 100]} added to the logits (ids outside the vocabulary: 400)"),
    "allowed_token_ids": _h("only these token ids may be produced"),
    "bad_words": _h("these words (token sequences) are never produced"),
    "logprobs": _h("the chosen tokens' logprobs (completions: with the k most likely; chat: a boolean)"),
    "top_logprobs": _h("chat: the k most likely per token (needs logprobs=true)", _CHAT),
    "prompt_logprobs": _h("every prompt token's logprob, rank and k most likely (not with stream)"),
    "return_tokens_as_token_ids": _h("logprobs tokens written 'token_id:{id}'"),
    "echo": _h("completions: the prompt is prepended to the text (with its logprobs); chat: the last message, "
               "when it is the assistant's, is prepended to the content"),
    "skip_special_tokens": _h("true: special tokens (but the thinking markers) are left out of the text; "
                              "false: none is; absent: pad / BOS / EOS are"),
    "spaces_between_special_tokens": _h("passed to the tokenizer's decode (fast tokenizers never put spaces "
                                        "between special tokens, as in vLLM)"),
    "truncate_prompt_tokens": _h("keep only the last k prompt tokens (-1: the context length)"),
    "add_special_tokens": _h("add the tokenizer's special tokens (BOS) to the prompt (default: chat false, "
                             "completions true)"),
    "add_generation_prompt": _h("the chat template's generation prompt (default true)", _CHAT),
    "continue_final_message": _h("the final message is left open and the model continues it", _CHAT),
    "chat_template": _h("the request's own template: a 400 unless rain serve --trust-request-chat-template",
                        _CHAT),
    "chat_template_kwargs": _h("extra template variables (chat_template inside: as chat_template)", _CHAT),
    "include_reasoning": _h("false: no reasoning_content (the thinking is dropped from the response)", _CHAT),
    "parallel_tool_calls": _h("a boolean; there are no tool calls (tools are refused), so either value holds",
                              _CHAT),
    "stream": _h("server-sent events"),
    "stream_options": _h("an object (only with stream=true)"),
    "stream_options.include_usage": _h("a last chunk with the usage"),
    "stream_options.continuous_usage_stats": _h("every chunk carries the usage so far"),
    "user": _h("the sticky-arm key and the log's user"),
    "safety_identifier": _h("a string; recorded nowhere and changes nothing (OpenAI's abuse-detection id)"),
    "prompt_cache_key": _h("a string; there is no prefix cache, so no cache is shared"),
    "prompt_cache_retention": _h("'in_memory' or '24h', a maximum retention: there is no prefix cache, so "
                                 "nothing is retained", _CHAT),
    "cache_salt": _h("a non-empty string; there is no prefix cache, so no cache is shared"),
    "rain_lambda": _h("the adapter's λ for this request"),
    "rain_arm": _h("a configured arm"),
    "rain_checks": _h("IFEval-style checks scored on the answer (reported, never a reward)"),
    "rain_reasoning_parser": _h("deepseek_r1: thinking in reasoning_content; none: in content", _CHAT),
}

_STRUCT = "structured output (guided decoding) is not implemented by this server"
#: the fields answered with a 400 naming them when they carry anything but an inert value
REFUSED: dict[str, FieldRule] = {
    "tools": _r("tool calling is not implemented by this server", []),
    "tool_choice": _r("tool calling is not implemented by this server", "none"),
    "functions": _r("function calling is not implemented by this server", [], endpoints=_CHAT),
    "function_call": _r("function calling is not implemented by this server", "none", endpoints=_CHAT),
    "suffix": _r("suffix (insertion) is not implemented by this server", "", endpoints=_COMPLETIONS),
    "best_of": _r("best_of is not implemented by this server (use n)", 1),
    "use_beam_search": _r("beam search is not implemented by this server", False),
    "length_penalty": _r("length_penalty applies to beam search, which this server does not implement", 1, 1.0),
    "response_format": _r(_STRUCT + " (only {\"type\": \"text\"})", {"type": "text"}),
    "structured_outputs": _r(_STRUCT),
    "guided_json": _r(_STRUCT),
    "guided_regex": _r(_STRUCT),
    "guided_choice": _r(_STRUCT),
    "guided_grammar": _r(_STRUCT),
    "guided_decoding_backend": _r(_STRUCT),
    "guided_whitespace_pattern": _r(_STRUCT),
    "structural_tag": _r(_STRUCT),
    "logits_processors": _r("a request cannot name code to run on the server", []),
    "modalities": _r("this server produces text only", ["text"], endpoints=_CHAT),
    "audio": _r("this server produces text only", endpoints=_CHAT),
    "prediction": _r("predicted outputs are not implemented by this server", endpoints=_CHAT),
    "web_search_options": _r("web search is not available on this server", endpoints=_CHAT),
    "store": _r("this server does not store completions for later retrieval", False, endpoints=_CHAT),
    "metadata": _r("metadata goes with store, which this server does not implement", {}, endpoints=_CHAT),
    "service_tier": _r("this server has one service tier", "auto", "default", endpoints=_CHAT),
    "reasoning_effort": _r("the served model has no reasoning-effort control (rain_lambda is its knob)",
                           endpoints=_CHAT),
    "verbosity": _r("the served model has no verbosity control", endpoints=_CHAT),
    "documents": _r("the served chat template takes no documents", [], endpoints=_CHAT),
    "mm_processor_kwargs": _r("this server serves a text-only model", {}),
    "media_io_kwargs": _r("this server serves a text-only model", {}, endpoints=_CHAT),
    "repetition_detection": _r("repetition detection is not implemented by this server"),
    "moderation": _r("this server runs no moderation", endpoints=_CHAT),
    "prompt_cache_options": _r("this server has no prompt cache (no breakpoints, no minimum lifetime)", {},
                               endpoints=_CHAT),
    "prompt_embeds": _r("prompt embeddings are not accepted by this server", endpoints=_COMPLETIONS),
    "priority": _r("this server does not schedule by priority", 0),
    "request_id": _r("the server assigns request ids (feedback is keyed by them)"),
    "kv_transfer_params": _r("disaggregated serving is not implemented by this server", {}),
    "vllm_xargs": _r("this server has no request extensions by that name", {}),
    "return_token_ids": _r("token ids of the output are not returned by this server (use logprobs with "
                           "return_tokens_as_token_ids)", False),
    "stream_options.include_obfuscation": _r("this server adds no obfuscation padding to chunks", False),
}


def _same(a: Any, b: Any) -> bool:
    """Equal, with bools never equal to numbers (``True == 1`` in Python)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _inert(rule: FieldRule, value: Any) -> bool:
    return any(_same(value, v) for v in rule.inert)


def _stream_options(body: dict) -> dict[str, Any]:
    so = body.get("stream_options")
    if so is None:
        return {}
    if not isinstance(so, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    if so and not body.get("stream"):   # vLLM's rule: an empty object is let through
        raise bad_request("stream_options can only be given with stream=true", "stream_options")
    for key in ("include_usage", "continuous_usage_stats"):
        if so.get(key) is not None and not isinstance(so[key], bool):
            raise bad_request(f"stream_options.{key} must be a boolean", f"stream_options.{key}")
    return {f"stream_options.{k}": v for k, v in so.items()}


def check_fields(body: dict, endpoint: str) -> None:
    """400 naming the first field of ``body`` that is REFUSED with a non-inert value, or that belongs
    to the other endpoint (``endpoint``: ``"chat"`` or ``"completions"``)."""
    fields = {**body, **_stream_options(body)}
    for name, value in fields.items():
        rule = HONOURED.get(name)
        if rule is None:
            rule = REFUSED.get(name)
            if rule is None:
                continue
            if endpoint in rule.endpoints and not _inert(rule, value):
                raise bad_request(f"{name} is not supported: {rule.what}", name, code="not_supported")
        if endpoint not in rule.endpoints and value is not None:
            other = "/v1/chat/completions" if endpoint == COMPLETIONS else "/v1/completions"
            raise bad_request(f"{name} applies to {other} only", name, code="not_supported")


def flag(body: dict, name: str, default: bool) -> bool:
    """A boolean field (``default`` when absent or null); 400 naming it otherwise."""
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"{name} must be a boolean, got {v!r}", name)
    return v


__all__ = ["CHAT", "COMPLETIONS", "HONOURED", "REFUSED", "FieldRule", "check_fields", "flag"]
