"""Output checks for the request log: thinking-format validity and IFEval-style compliance.

Thinking format: valid when the completion contains ``</think>`` and non-blank text after the
last one.  Compliance: a request may carry ``rain_checks`` = a list of
``{"instruction_id": "punctuation:no_comma", "kwargs": {...}}`` (``id`` is accepted for
``instruction_id``); the answer (text after ``</think>``, or all of it without one) complies when
every check passes.  Checks come from ``rain_adapter.evaluation.checks.check(instruction_id,
kwargs, response) -> bool`` when that module exists; otherwise from the small built-in set below.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from .errors import bad_request

THINK_CLOSE = "</think>"


def think_format_valid(text: str) -> bool:
    """``</think>`` present and an answer (non-blank text) after it.

    Uses ``rain_adapter.evaluation.checks.think_format_ok`` when present (the same definition as
    the sweeps: exactly one ``</think>``, non-empty reasoning and answer), so A/B numbers and
    evaluation numbers agree; otherwise: ``</think>`` present and non-blank text after the last one.
    """
    try:
        from rain_adapter.evaluation.checks import think_format_ok  # type: ignore[attr-defined]

        return bool(think_format_ok(text))
    except ImportError:
        pass
    i = text.rfind(THINK_CLOSE)
    return i >= 0 and bool(text[i + len(THINK_CLOSE):].strip())


def answer_part(text: str) -> str:
    i = text.rfind(THINK_CLOSE)
    return text[i + len(THINK_CLOSE):].strip() if i >= 0 else text.strip()


# ----------------------------------------------------------------- built-in fallback checks
def _words(t: str) -> list[str]:
    return re.findall(r"\b\w+\b", t)


def _relation(n: float, rel: str, k: float) -> bool:
    if rel in ("less than", "<"):
        return n < k
    if rel in ("at least", ">="):
        return n >= k
    raise ValueError(f"relation must be 'less than' or 'at least', got {rel!r}")


_FALLBACK: dict[str, Callable[..., bool]] = {
    "punctuation:no_comma": lambda r: "," not in r,
    "change_case:english_lowercase": lambda r: r == r.lower(),
    "change_case:english_capital": lambda r: r == r.upper(),
    "length_constraints:number_words": lambda r, relation, num_words: _relation(len(_words(r)), relation, num_words),
    "keywords:existence": lambda r, keywords: all(re.search(re.escape(k), r, re.I) for k in keywords),
    "keywords:forbidden_words": lambda r, forbidden_words: not any(
        re.search(r"\b" + re.escape(k) + r"\b", r, re.I) for k in forbidden_words),
    "startend:end_checker": lambda r, end_phrase: r.strip().lower().endswith(end_phrase.strip().lower()),
    "startend:quotation": lambda r: len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"',
    "detectable_format:number_bullet_lists": lambda r, num_bullets: len(
        re.findall(r"^\s*[\*\-]\s", r, re.M)) == num_bullets,
    "detectable_format:json_format": lambda r: _is_json(r),
}


def _is_json(r: str) -> bool:
    s = r.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    try:
        json.loads(s)
        return True
    except ValueError:
        return False


def _fallback_check(instruction_id: str, kwargs: dict, response: str) -> bool:
    fn = _FALLBACK[instruction_id]
    return bool(fn(response, **{k: v for k, v in kwargs.items() if v is not None}))


def _resolve() -> tuple[Callable[[str, dict, str], bool], str]:
    try:
        from rain_adapter.evaluation.checks import check  # type: ignore[attr-defined]

        return check, "rain_adapter.evaluation.checks"
    except Exception:  # noqa: BLE001 - module absent or broken: use the built-in set
        return _fallback_check, "builtin"


def known_ids() -> set[str] | None:
    """Instruction ids we can validate up front (None: the external module decides)."""
    _, src = _resolve()
    if src != "builtin":
        try:
            from rain_adapter.evaluation import checks as ext  # type: ignore

            ids = set(getattr(ext, "SUPPORTED_IDS", ()) or ())
            reg = ext._lm_eval_registry() if hasattr(ext, "_lm_eval_registry") else None
            ids |= set(reg or ())
            if ids:
                return ids
        except Exception:  # noqa: BLE001
            pass
        return None
    return set(_FALLBACK)


def parse_rain_checks(value: Any) -> list[dict]:
    """Validate the request field ``rain_checks``; returns [{"instruction_id", "kwargs"}]."""
    if value is None:
        return []
    if isinstance(value, dict) and "instruction_id_list" in value:  # IFEval record layout
        ids, kws = value.get("instruction_id_list") or [], value.get("kwargs") or [{}] * len(value["instruction_id_list"])
        value = [{"instruction_id": i, "kwargs": k} for i, k in zip(ids, kws)]
    if not isinstance(value, list):
        raise bad_request("rain_checks must be a list of {instruction_id, kwargs}", "rain_checks")
    known = known_ids()
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
        if known is not None and iid not in known:
            raise bad_request(f"rain_checks[{i}]: unknown instruction_id {iid!r}; known: {sorted(known)}",
                              "rain_checks")
        out.append({"instruction_id": iid, "kwargs": kw})
    return out


def run_checks(checks: list[dict], completion: str) -> tuple[bool | None, list[dict]]:
    """(all passed, per-check results); (None, []) when there are no checks."""
    if not checks:
        return None, []
    fn, _ = _resolve()
    answer = answer_part(completion)
    results = []
    for c in checks:
        try:
            ok = bool(fn(c["instruction_id"], c["kwargs"], answer))
            err = None
        except Exception as exc:  # noqa: BLE001 - a broken check counts as failed, with the reason logged
            ok, err = False, f"{type(exc).__name__}: {exc}"
        results.append({"instruction_id": c["instruction_id"], "ok": ok, **({"error": err} if err else {})})
    return all(r["ok"] for r in results), results


def checks_source() -> str:
    return _resolve()[1]
