"""Checks that run before any work: the API key and the body size (an ASGI middleware), and a bound
on a prompt's token count that needs no tokenizer.

:class:`GuardMiddleware` answers before the route (and before a byte of the body is read):

* **API key** — every path except ``/health`` needs ``Authorization: Bearer KEY`` when the server
  has a key; ``/metrics``, ``/docs``, ``/redoc`` and ``/openapi.json`` too with ``protect_all``.
  A refused request is a 401 and its body is never read.
* **body size** — a ``Content-Length`` over ``max_body_bytes`` is a 413 at once; a body without one
  (chunked) is counted while it streams in and refused with a 413 as soon as it passes the limit.

:func:`parse_json_body` reads a body as a JSON object nested at most :data:`MAX_JSON_DEPTH` deep (a
400 otherwise, also for JSON too deep for the parser itself).

:func:`min_prompt_tokens` is a lower bound on a text's token count from its UTF-8 length and the
longest vocabulary entry (a token never covers more than 4 bytes per character of its vocabulary
string), so a prompt that cannot fit ``--max-model-len`` is refused without tokenising it
(:func:`check_prompt_fits`; generation, ``/tokenize`` and ``/detokenize`` alike);
:func:`template_chars` is the matching bound on a rendered chat template.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .errors import APIError, bad_request

#: the paths a key never protects (liveness probes)
OPEN_PATHS = frozenset({"/health"})
#: the paths a key protects only with ``--protect-all``
DOC_PATHS = frozenset({"/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

# caps on free-text fields (characters)
MAX_USER_CHARS = 256
MAX_COMMENT_CHARS = 4096
MAX_STOP_CHARS = 256
MAX_STOP_STRINGS = 16
MAX_REASON_CHARS = 500
# caps on the choices of one generation request (``n``, a list of prompts, their product)
MAX_N = 16
MAX_PROMPTS = 64
MAX_CHOICES = 128
#: checks one request may name (a spec:regex search may take up to bounded_regex.TIMEOUT_S)
MAX_RAIN_CHECKS = 32
#: how deeply a request body's JSON may nest
MAX_JSON_DEPTH = 64


def needs_key(path: str, protect_all: bool) -> bool:
    """Whether ``path`` needs the API key (when the server has one)."""
    if path in OPEN_PATHS:
        return False
    return protect_all or path not in DOC_PATHS


def key_error(headers: dict[str, str], key: str) -> APIError | None:
    """The 401 for a request without the right bearer token, or None."""
    h = headers.get("authorization", "")
    if not h:
        return APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if h != f"Bearer {key}":
        return APIError(401, "incorrect API key provided", code="invalid_api_key")
    return None


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over this server's limit of {limit} bytes (--max-body-bytes)",
                    code="request_too_large")


class GuardMiddleware:
    """ASGI middleware: API key, then body size, before the route runs (see the module doc).

    ``config()`` returns ``(api_key or None, protect_all, max_body_bytes, on_error)``; ``on_error(status)``
    counts a refusal in the metrics.
    """

    def __init__(self, app, config: Callable[[], tuple[str | None, bool, int, Callable[[int], None]]]):
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        key, protect_all, limit, on_error = self.config()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        err = key_error(headers, key) if key and needs_key(scope.get("path", ""), protect_all) else None
        if err is None:
            err = _length_error(headers.get("content-length"), limit)
        if err is not None:
            on_error(err.status)
            return await _send_error(send, err)
        return await self.app(scope, _counting_receive(receive, limit), send)


def _length_error(value: str | None, limit: int) -> APIError | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        return APIError(400, f"bad Content-Length header {value[:40]!r}", code="invalid_request")
    return too_large(limit) if n > limit else None


def _counting_receive(receive, limit: int):
    """``receive`` that raises a 413 :class:`APIError` once the body passes ``limit`` bytes."""
    seen = 0

    async def wrapped() -> dict[str, Any]:
        nonlocal seen
        msg = await receive()
        if msg.get("type") == "http.request":
            seen += len(msg.get("body", b""))
            if seen > limit:
                raise too_large(limit)
        return msg

    return wrapped


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object nested at most :data:`MAX_JSON_DEPTH` deep (400 ``invalid_json``
    otherwise)."""
    too_deep = APIError(400, f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep",
                        code="invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"could not parse the JSON body of the request: {e}", code="invalid_json") from None
    except RecursionError:  # deeper than the interpreter's stack: json.loads gives up
        raise too_deep from None
    if not isinstance(body, dict):
        raise APIError(400, "the JSON body must be an object", code="invalid_json")
    level, depth = [body], 1
    while level:  # breadth first: no recursion of our own
        level = [v for x in level for v in (x.values() if isinstance(x, dict) else x) if isinstance(v, (dict, list))]
        depth += bool(level)
        if depth > MAX_JSON_DEPTH:
            raise too_deep
    return body


def max_token_bytes(tokenizer) -> int:
    """Bytes of text one token can cover at most: 4 UTF-8 bytes per character of the longest vocab entry."""
    try:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    except Exception:  # noqa: BLE001 - a tokenizer without get_vocab: no cheap bound
        return 1 << 30
    return 4 * max(1, longest)


def min_prompt_tokens(texts, bytes_per_token: int) -> int:
    """A lower bound on the tokens of ``texts`` (strings) without tokenising them."""
    n = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return -(-n // bytes_per_token)


def check_prompt_fits(lower: int, context_length: int, param: str, reserve: int = 0, why: str = ";") -> None:
    """400 ``context_length_exceeded`` when a prompt of at least ``lower`` tokens plus ``reserve`` (the
    tokens to generate) is over ``context_length`` (``--max-model-len``); ``why`` names the reserve.
    Generation and ``/tokenize`` call it before tokenising (``lower``: :func:`min_prompt_tokens`)."""
    if lower + reserve > context_length:
        raise bad_request(f"the prompt has at least {lower} tokens{why} that is over --max-model-len "
                          f"{context_length}", param, code="context_length_exceeded")


def template_chars(context_length: int, bytes_per_token: int, max_body_bytes: int) -> int:
    """Characters a rendered chat template may have: what ``context_length`` tokens can hold (at most
    4 Mi characters, or twice ``max_body_bytes`` when that is more)."""
    return min(context_length * bytes_per_token, max(1 << 22, 2 * max_body_bytes))


__all__ = ["DEFAULT_MAX_BODY_BYTES", "GuardMiddleware", "MAX_CHOICES", "MAX_COMMENT_CHARS", "MAX_JSON_DEPTH", "MAX_N",
           "MAX_PROMPTS", "MAX_RAIN_CHECKS", "MAX_STOP_CHARS", "MAX_STOP_STRINGS", "MAX_USER_CHARS",
           "check_prompt_fits", "key_error", "max_token_bytes", "min_prompt_tokens", "needs_key", "parse_json_body",
           "template_chars", "too_large"]
