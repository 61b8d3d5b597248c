"""The inputs of a generation request: chat ``messages`` and completions ``prompt`` (text, token ids,
or a list of either), each validated with a 400 naming the field. Shared by the request parsers
(:mod:`~rain_adapter.serve.requests`) and ``/tokenize`` (:mod:`~rain_adapter.serve.tokenize`)."""

from __future__ import annotations

from typing import Any

from .errors import bad_request
from .limits import MAX_PROMPTS

CHAT_ROLES = ("system", "user", "assistant", "developer")


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


def read_messages(body: dict) -> tuple[dict[str, str], ...]:
    """``messages``: a non-empty list of ``{role, content}`` (text or text parts); ``developer`` is read as
    ``system``, which chat templates know."""
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


def _one_prompt(p: Any, where: str) -> str | tuple[int, ...]:
    if isinstance(p, str):
        if not p:
            raise bad_request(f"the {where} is empty: it has no tokens", "prompt", code="empty_prompt")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return tuple(p)
    if isinstance(p, list) and not p:
        raise bad_request(f"the {where} is empty: it has no tokens", "prompt", code="empty_prompt")
    raise bad_request("prompt must be a string, a list of token ids, or a list of either (several prompts)",
                      "prompt")


def read_prompts(body: dict) -> tuple[str | tuple[int, ...], ...]:
    """The request's prompts: ``"text"``, ``[ids]``, ``["a", "b"]`` or ``[[ids], [ids]]`` (≤ MAX_PROMPTS)."""
    p = body.get("prompt")
    if not (isinstance(p, list) and p and isinstance(p[0], (str, list))):
        return (_one_prompt(p, "prompt"),)
    if len(p) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request, got {len(p)}", "prompt",
                          code="too_many_prompts")
    if not (all(isinstance(q, str) for q in p) or all(isinstance(q, list) for q in p)):
        raise bad_request("a list of prompts must be all strings or all lists of token ids", "prompt")
    where = "prompt" if len(p) == 1 else "prompt[{}]"
    return tuple(_one_prompt(q, where.format(i)) for i, q in enumerate(p))


__all__ = ["CHAT_ROLES", "read_messages", "read_prompts"]
