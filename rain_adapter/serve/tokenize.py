"""vLLM's ``POST /tokenize`` and ``POST /detokenize``.

``/tokenize``: ``{"prompt": str, "add_special_tokens": true}`` or ``{"messages": [...],
"add_generation_prompt": true, "chat_template_kwargs": {...}}`` → ``{"count", "max_model_len",
"tokens", "token_strs": null}``. ``/detokenize``: ``{"tokens": [ids]}`` → ``{"prompt": str}``.
``model``, when given, must be the served one (404 otherwise).
"""

from __future__ import annotations

from typing import Any

from .errors import APIError, bad_request
from .requests import _messages


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


def tokenize_body(body: dict, tokenizer, model_name: str, max_model_len: int) -> dict[str, Any]:
    """The ``/tokenize`` answer (runs the tokenizer: call it in a worker thread)."""
    _model(body, model_name)
    if "messages" in body:
        tk = body.get("chat_template_kwargs") or {}
        if not isinstance(tk, dict):
            raise bad_request("chat_template_kwargs must be an object", "chat_template_kwargs")
        text = tokenizer.apply_chat_template(list(_messages(body)), tokenize=False,
                                             add_generation_prompt=_flag(body, "add_generation_prompt", True), **tk)
        ids = tokenizer(text, add_special_tokens=_flag(body, "add_special_tokens", False))["input_ids"]
    else:
        p = body.get("prompt")
        if not isinstance(p, str):
            raise bad_request("prompt must be a string (or give messages)", "prompt")
        ids = tokenizer(p, add_special_tokens=_flag(body, "add_special_tokens", True))["input_ids"]
    ids = [int(t) for t in ids]
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": None}


def detokenize_body(body: dict, tokenizer, model_name: str) -> dict[str, Any]:
    """The ``/detokenize`` answer."""
    _model(body, model_name)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise bad_request("tokens must be a list of token ids", "tokens")
    vocab = len(tokenizer)
    if any(t < 0 or t >= vocab for t in ids):
        raise bad_request(f"token ids must be in [0, {vocab})", "tokens")
    return {"prompt": tokenizer.decode(ids)}


__all__ = ["detokenize_body", "tokenize_body"]
