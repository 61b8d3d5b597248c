"""Readers of single request-body fields, shared by the request parsers (``requests``, ``sampling``,
``logprobs``): each returns the typed value or raises an OpenAI-style 400 naming the field.

A leaf of the serve package: it imports only ``errors`` and the number predicates of
:mod:`rain_adapter.format.config`, so every parser can import it at module level.
"""

from __future__ import annotations

from ..format.config import is_finite_number, is_int
from .errors import bad_request


def number_field(body: dict, name: str, default: float | None, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> float | None:
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); ``default`` when absent or null."""
    v = body.get(name, None)
    if v is None:
        return default
    if not is_finite_number(v):
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
    if not is_int(v):
        raise bad_request(f"{name} must be an integer, got {v!r}", name)
    return v


def text_field(body: dict, name: str, cap: int) -> str | None:
    """A string of at most ``cap`` characters, or None when absent / null."""
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise bad_request(f"{name} must be a string, got {type(v).__name__}", name)
    if len(v) > cap:
        raise bad_request(f"{name} may have at most {cap} characters, got {len(v)}", name)
    return v


__all__ = ["int_field", "number_field", "text_field"]
