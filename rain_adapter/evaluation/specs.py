"""Declarative checks: the ``spec:*`` ids, whose parameters are a prompt row's kwargs.

A prompt row can name a check by what it tests instead of by code::

    {"prompt": "...", "instruction_id_list": ["spec:regex", "spec:word_count"],
     "kwargs": [{"pattern": "^Answer:", "flags": "m"}, {"max": 50}]}

Every kind runs on the answer part of a response (thinking stripped); ``spec:regex`` can look at the
whole response with ``where="response"``. Kinds and their fields:

* ``spec:regex`` — ``pattern`` (required), ``flags`` (a string of ``i`` / ``m`` / ``s``),
  ``must_match`` (default true: the pattern must be found; false: it must not), ``where``
  (``"answer"`` or ``"response"``). The pattern is bounded (:mod:`~rain_adapter.evaluation.bounded_regex`):
  one that is too long or too large is refused like one that does not compile, and a search that runs
  over the time bound raises :class:`~rain_adapter.evaluation.bounded_regex.RegexTimeout` (the check is
  then unscored).
* ``spec:contains`` / ``spec:not_contains`` — exactly one of ``text`` (a string), ``any`` or ``all``
  (lists of strings); ``case_sensitive`` (default false). ``not_contains`` is the negation:
  ``any`` then means "none of them", ``all`` "not every one of them".
* ``spec:json`` — the answer parses as JSON (a ```` ``` ```` / ```` ```json ```` fence is allowed);
  ``required_keys``: a list of keys the top-level object must have.
* ``spec:word_count``, ``spec:sentence_count``, ``spec:paragraph_count``, ``spec:line_count``,
  ``spec:char_count`` — ``min`` and / or ``max`` (inclusive integers; at least one). Words are runs
  of letters / digits (inner ``'`` or ``-`` kept), sentences as in the IFEval checks, paragraphs are
  blocks separated by blank lines, lines are the non-blank lines, characters those of the answer.
* ``spec:startswith`` / ``spec:endswith`` / ``spec:equals`` — ``text`` (required),
  ``case_sensitive`` (default false); the answer is stripped first.

:func:`validate_spec` checks a kind's kwargs (unknown field, missing or wrongly typed one, a regex
that does not compile or is refused by the bound) and raises :class:`SpecError` naming the field; prompt files are validated
when they are loaded, server requests when they are parsed, never first at scoring time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .bounded_regex import RegexRefused, compile_bounded
from .checks import UnsupportedInstruction, _sentences

PREFIX = "spec:"


class SpecError(UnsupportedInstruction):
    """Invalid kwargs of a declarative check; ``field`` names the offending field."""

    def __init__(self, check_id: str, field: str, message: str):
        super().__init__(f"{check_id}: field {field!r}: {message}")
        self.check_id, self.field, self.message = check_id, field, message


@dataclass(frozen=True)
class _Kind:
    fields: dict[str, tuple[type | tuple[type, ...], Any]]  # name -> (types, default; ... = required)
    run: Callable[[str, str, dict[str, Any]], bool]          # (answer, response, kwargs) -> compliant
    check: Callable[[str, dict[str, Any]], None] | None = None  # extra validation: (id, kwargs)


_REQUIRED = ...
_STR_LIST = (list, tuple)


def _fold(s: str, kw: dict[str, Any]) -> str:
    return s if kw.get("case_sensitive") else s.casefold()


def _regex(answer: str, response: str, kw: dict[str, Any]) -> bool:
    pat = compile_bounded(kw["pattern"], kw.get("flags", ""))
    found = pat.search(response if kw.get("where") == "response" else answer)  # RegexTimeout: unscored
    return (found is not None) == kw.get("must_match", True)


def _check_regex(cid: str, kw: dict[str, Any]) -> None:
    flags = kw.get("flags", "")
    if any(c not in "ims" for c in flags):
        raise SpecError(cid, "flags", f"{flags!r}: only the letters i, m and s")
    if kw.get("where", "answer") not in ("answer", "response"):
        raise SpecError(cid, "where", f"{kw['where']!r}: 'answer' or 'response'")
    try:
        compile_bounded(kw["pattern"], flags)
    except RegexRefused as e:
        raise SpecError(cid, "pattern", str(e)) from None


def _contains(answer: str, _: str, kw: dict[str, Any]) -> bool:
    hay = _fold(answer, kw)
    if "text" in kw:
        return _fold(kw["text"], kw) in hay
    if "any" in kw:
        return any(_fold(t, kw) in hay for t in kw["any"])
    return all(_fold(t, kw) in hay for t in kw["all"])


def _check_contains(cid: str, kw: dict[str, Any]) -> None:
    given = [k for k in ("text", "any", "all") if k in kw]
    if len(given) != 1:
        got = f" (got {', '.join(given)})" if given else ""
        raise SpecError(cid, "text", f"give exactly one of 'text', 'any' or 'all'{got}")
    for k in ("any", "all"):
        if k in kw and (not kw[k] or not all(isinstance(t, str) for t in kw[k])):
            raise SpecError(cid, k, "must be a non-empty list of strings")


def _json(answer: str, _: str, kw: dict[str, Any]) -> bool:
    s = answer.strip()
    m = re.fullmatch(r"```[A-Za-z]*\s*\n?(.*?)\n?```", s, flags=re.DOTALL)
    try:
        obj = json.loads(m.group(1) if m else s)
    except ValueError:
        return False
    keys = kw.get("required_keys")
    return not keys or (isinstance(obj, dict) and all(k in obj for k in keys))


def _check_keys(cid: str, kw: dict[str, Any]) -> None:
    if "required_keys" in kw and not all(isinstance(k, str) for k in kw["required_keys"]):
        raise SpecError(cid, "required_keys", "must be a list of strings")


def _counter(count: Callable[[str], int]) -> Callable[[str, str, dict[str, Any]], bool]:
    def run(answer: str, _: str, kw: dict[str, Any]) -> bool:
        n = count(answer)
        return kw.get("min", 0) <= n and ("max" not in kw or n <= kw["max"])
    return run


def _check_bounds(cid: str, kw: dict[str, Any]) -> None:
    if "min" not in kw and "max" not in kw:
        raise SpecError(cid, "min", "give 'min' and / or 'max'")
    for k in ("min", "max"):
        if k in kw and (isinstance(kw[k], bool) or kw[k] < 0):
            raise SpecError(cid, k, f"must be a non-negative integer, got {kw[k]!r}")
    if "min" in kw and "max" in kw and kw["min"] > kw["max"]:
        raise SpecError(cid, "max", f"max ({kw['max']}) is below min ({kw['min']})")


def _affix(test: Callable[[str, str], bool]) -> Callable[[str, str, dict[str, Any]], bool]:
    return lambda answer, _, kw: test(_fold(answer.strip(), kw), _fold(kw["text"].strip(), kw))


_BOUNDS = {"min": (int, None), "max": (int, None)}
_AFFIX = {"text": (str, _REQUIRED), "case_sensitive": (bool, False)}
_CONTAINS = {"text": (str, None), "any": (_STR_LIST, None), "all": (_STR_LIST, None), "case_sensitive": (bool, False)}
KINDS: dict[str, _Kind] = {
    "regex": _Kind({"pattern": (str, _REQUIRED), "flags": (str, ""), "must_match": (bool, True),
                    "where": (str, "answer")}, _regex, _check_regex),
    "contains": _Kind(_CONTAINS, _contains, _check_contains),
    "not_contains": _Kind(_CONTAINS, lambda a, r, kw: not _contains(a, r, kw), _check_contains),
    "json": _Kind({"required_keys": (_STR_LIST, None)}, _json, _check_keys),
    "word_count": _Kind(_BOUNDS, _counter(lambda s: len(re.findall(r"\w+(?:['’-]\w+)*", s))), _check_bounds),
    "sentence_count": _Kind(_BOUNDS, _counter(lambda s: len(_sentences(s))), _check_bounds),
    "paragraph_count": _Kind(_BOUNDS, _counter(lambda s: len([p for p in re.split(r"\n\s*\n", s) if p.strip()])),
                             _check_bounds),
    "line_count": _Kind(_BOUNDS, _counter(lambda s: len([x for x in s.splitlines() if x.strip()])), _check_bounds),
    "char_count": _Kind(_BOUNDS, _counter(len), _check_bounds),
    "startswith": _Kind(_AFFIX, _affix(str.startswith)),
    "endswith": _Kind(_AFFIX, _affix(str.endswith)),
    "equals": _Kind(_AFFIX, _affix(str.__eq__)),
}
SPEC_IDS = tuple(sorted(PREFIX + k for k in KINDS))


def is_spec(check_id: str) -> bool:
    """Whether ``check_id`` names a declarative kind (``spec:<kind>``)."""
    return check_id.startswith(PREFIX) and check_id[len(PREFIX):] in KINDS


def validate_spec(check_id: str, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The kwargs of a ``spec:*`` check, checked (``None``-valued entries dropped); :class:`SpecError` else."""
    kind = KINDS[check_id[len(PREFIX):]]
    if kwargs is not None and not isinstance(kwargs, dict):
        raise SpecError(check_id, "kwargs", f"must be an object, got {type(kwargs).__name__}")
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None}
    for k, v in kw.items():
        if k not in kind.fields:
            raise SpecError(check_id, k, f"unknown field (known: {', '.join(sorted(kind.fields))})")
        types = kind.fields[k][0]
        if not isinstance(v, types) or (types is int and isinstance(v, bool)):
            want = "a list" if types is _STR_LIST else getattr(types, "__name__", str(types))
            raise SpecError(check_id, k, f"must be {want}, got {v!r}")
    for k, (_, default) in kind.fields.items():
        if default is _REQUIRED and k not in kw:
            raise SpecError(check_id, k, "missing (required)")
    if kind.check is not None:
        kind.check(check_id, kw)
    return kw


def run_spec(check_id: str, kwargs: dict[str, Any] | None, answer: str, response: str) -> bool:
    """Score a ``spec:*`` check: ``answer`` is the response with thinking stripped."""
    kw = validate_spec(check_id, kwargs)
    return bool(KINDS[check_id[len(PREFIX):]].run(answer, response, kw))


__all__ = ["KINDS", "SPEC_IDS", "SpecError", "is_spec", "run_spec", "validate_spec"]
