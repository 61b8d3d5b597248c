"""Scoring responses: compliance through the check registry, accuracy through an answer extractor.

:func:`follow_instructions` is the one definition of prompt-level compliance (sweeps, ``rain tune``
and the server's ``rain_checks`` use it): every instruction is scored by a
:class:`~rain_adapter.evaluation.registry.CheckRegistry`; one that cannot be scored — an unknown id,
bad kwargs, a check returning None, any exception (lm-eval without NLTK's ``punkt_tab`` raises
``LookupError``) — is *unscored*, with the reason ``"{ExcType}: {message}"``, and left out.

:func:`score_response` scores one prompt row and never raises for a check or an extractor; what it
could not score is listed under ``unscored``. :func:`aggregate` gives the rates and how many rows
each is over (``n_compliance``, ``n_accuracy``, ``n_format``), so a table or CSV shows the scored n.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .answers import Extractor, answer_correct
from .checks import InstructionResult, has_thinking, strip_thinking, think_format_ok
from .registry import CheckRegistry, default_registry


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def follow_instructions(instructions: Sequence[tuple[str, dict[str, Any] | None]], response: str,
                        prompt: str | None = None, *,
                        registry: CheckRegistry | None = None) -> tuple[bool | None, list[InstructionResult]]:
    """``(all scored instructions pass, per-instruction results)``; the first is None when none was scored."""
    reg = registry or default_registry()
    results = []
    for iid, kw in instructions:
        try:
            ok = reg.check(iid, kw, response, prompt=prompt)
        except Exception as e:  # noqa: BLE001 - a check that cannot run is unscored, never non-compliant
            results.append(InstructionResult(iid, None, _reason(e)))
            continue
        err = None if ok is not None else f"{iid}: the check returned None (it cannot score this response)"
        results.append(InstructionResult(iid, ok, err))
    scored = [r.ok for r in results if r.ok is not None]
    return (all(scored) if scored else None), results


def _extractor_name(extract: str | Extractor | None) -> str:
    if extract is None or isinstance(extract, str):
        return extract or "number"
    return getattr(extract, "__name__", "custom")


def score_response(row: dict[str, Any], response: str, *, registry: CheckRegistry | None = None,
                   extract: str | Extractor | None = None) -> dict[str, Any]:
    """Metrics of one ``response`` to a prompt row ``{prompt, instruction_id_list, kwargs, answer?,
    answer_extract?}``.

    Returns ``{follow_all, follow_each: [bool|None], think_ok, has_think, correct, unscored}``:
    ``follow_all`` is None when no instruction was scored, ``correct`` None without an answer (or
    when extraction failed), ``unscored`` a list of ``{"check", "reason"}``. The row's
    ``answer_extract`` overrides ``extract`` (default ``"number"``).
    """
    ids = list(row.get("instruction_id_list") or [])
    kwargs = list(row.get("kwargs") or [{}] * len(ids))
    follow_all, each = follow_instructions(list(zip(ids, kwargs)), response, prompt=row.get("prompt"),
                                           registry=registry)
    unscored = [{"check": r.instruction_id, "reason": r.error or "unscored"} for r in each if r.ok is None]
    answer, correct = row.get("answer"), None
    if answer not in (None, ""):
        how = row.get("answer_extract") or extract
        try:
            correct = bool(answer_correct(strip_thinking(response), answer, how))
        except Exception as e:  # noqa: BLE001 - an extractor that fails leaves accuracy unscored
            unscored.append({"check": f"answer:{_extractor_name(how)}", "reason": _reason(e)})
    return {
        "follow_all": follow_all,
        "follow_each": [r.ok for r in each],
        "think_ok": think_format_ok(response),
        "has_think": has_thinking(response),
        "correct": correct,
        "unscored": unscored,
    }


def aggregate(scores: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Means over rows: compliance (prompt-level strict), instruction-level, format validity,
    thinking rate, accuracy (NaN where nothing was scored); ``n`` rows, ``n_compliance`` /
    ``n_accuracy`` / ``n_format`` the rows each rate is over, ``unscored`` the rows with anything
    unscored (a check or the answer)."""
    nan = float("nan")

    def mean(xs: list[bool]) -> float:
        return sum(xs) / len(xs) if xs else nan

    follow = [s["follow_all"] for s in scores if s["follow_all"] is not None]
    inst = [e for s in scores for e in s["follow_each"] if e is not None]
    correct = [s["correct"] for s in scores if s["correct"] is not None]
    return {
        "compliance": mean(follow),
        "instruction_level": mean(inst),
        "format_validity": mean([s["think_ok"] for s in scores]),
        "thinking_rate": mean([s["has_think"] for s in scores]),
        "accuracy": mean(correct),
        "n": float(len(scores)),
        "n_compliance": len(follow),
        "n_accuracy": len(correct),
        "n_format": len(scores),
        "unscored": sum(1 for s in scores if s.get("unscored")),
    }


__all__ = ["aggregate", "follow_instructions", "score_response"]
