"""vLLM's ``POST /tokenize`` and ``POST /detokenize``, with generation's limits.

``/tokenize``: ``{"prompt": str, "add_special_tokens": true}`` or ``{"messages": [...],
"add_generation_prompt": true, "continue_final_message": false, "chat_template_kwargs": {...}}``
→ ``{"count", "max_model_len", "tokens", "token_strs"}`` (``token_strs`` null unless
``"return_token_strs": true``, vLLM's field; ``tools`` / ``mm_processor_kwargs`` are a 400, as on chat). ``/detokenize``: ``{"tokens": [ids]}`` → ``{"prompt": str}``.
``model``, when given, must be the served one (404 otherwise).

The rules are generation's: the body size (the middleware), a prompt that cannot fit
``--max-model-len`` refused before it is tokenised (a lower bound from its length,
:func:`~rain_adapter.serve.limits.check_prompt_fits`) and after (its token count), and the chat
template rendered in the bounded sandbox with a request's own template refused unless the server
trusts them (:mod:`~rain_adapter.serve.templates`). ``/detokenize`` takes at most
``--max-model-len`` ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import APIError, bad_request
from .limits import check_prompt_fits, min_prompt_tokens
from .inputs import read_messages
from .templates import TemplateLimits, TemplateRefused, render_chat, template_options


@dataclass(frozen=True)
class TokenizeLimits:
    """What ``/tokenize`` and ``/detokenize`` allow (the server's generation limits)."""

    model_name: str
    max_model_len: int
    bytes_per_token: int
    template: TemplateLimits
    trust_request_chat_template: bool = False


def _model(body: dict, model_name: str) -> None:
    m = body.get("model")
    if m is not None and m != model_name:
        raise APIError(404, f"the model {m!r} does not exist; this server serves {model_name!r}", param="model",
                       code="model_not_found")


def _flag(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if not isinstance(v, bool):
        raise bad_request(f"{name} must be a boolean", name)
    return v


def _chat_text(body: dict, tokenizer, limits: TokenizeLimits) -> str:
    messages = list(read_messages(body))
    kwargs, template = template_options(body, limits.trust_request_chat_template)
    check_prompt_fits(min_prompt_tokens([m["content"] for m in messages], limits.bytes_per_token),
                      limits.max_model_len, "messages")
    cont = _flag(body, "continue_final_message", False)   # as on /v1/chat/completions
    kw = {"add_generation_prompt": _flag(body, "add_generation_prompt", not cont), **dict(kwargs)}
    if cont:
        if kw["add_generation_prompt"]:
            raise bad_request("continue_final_message and add_generation_prompt cannot both be true",
                              "continue_final_message")
        kw["continue_final_message"] = True
    try:
        return render_chat(tokenizer, messages, limits.template, chat_template=template, **kw)
    except TemplateRefused as e:
        raise bad_request(str(e), "chat_template" if template else "chat_template_kwargs" if kwargs else "messages",
                          code="chat_template_failed") from None


def tokenize_body(body: dict, tokenizer, limits: TokenizeLimits) -> dict[str, Any]:
    """The ``/tokenize`` answer (runs the tokenizer: call it in a worker thread)."""
    _model(body, limits.model_name)
    for name in ("tools", "mm_processor_kwargs"):
        if body.get(name) not in (None, [], {}):
            raise bad_request(f"{name} is not supported by this server", name, code="not_supported")
    strs = _flag(body, "return_token_strs", False)
    if "messages" in body:
        text = _chat_text(body, tokenizer, limits)
        special, param = _flag(body, "add_special_tokens", False), "messages"
    else:
        text = body.get("prompt")
        if not isinstance(text, str):
            raise bad_request("prompt must be a string (or give messages)", "prompt")
        special, param = _flag(body, "add_special_tokens", True), "prompt"
    check_prompt_fits(min_prompt_tokens([text], limits.bytes_per_token), limits.max_model_len, param)
    ids = [int(t) for t in tokenizer(text, add_special_tokens=special)["input_ids"]]
    if len(ids) > limits.max_model_len:
        raise bad_request(f"the prompt has {len(ids)} tokens; this model's context length is {limits.max_model_len}",
                          param, code="context_length_exceeded")
    return {"count": len(ids), "max_model_len": limits.max_model_len, "tokens": ids,
            "token_strs": tokenizer.convert_ids_to_tokens(ids) if strs else None}


def detokenize_body(body: dict, tokenizer, limits: TokenizeLimits) -> dict[str, Any]:
    """The ``/detokenize`` answer."""
    _model(body, limits.model_name)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise bad_request("tokens must be a list of token ids", "tokens")
    if len(ids) > limits.max_model_len:
        raise bad_request(f"{len(ids)} token ids; at most --max-model-len {limits.max_model_len}", "tokens",
                          code="context_length_exceeded")
    vocab = len(tokenizer)
    if any(t < 0 or t >= vocab for t in ids):
        raise bad_request(f"token ids must be in [0, {vocab})", "tokens")
    return {"prompt": tokenizer.decode(ids)}


__all__ = ["TokenizeLimits", "detokenize_body", "tokenize_body"]
