"""Scoring a completion with evaluation's checks, never letting a check that cannot run mislabel it.

:func:`score_output` calls evaluation's ``think_format_ok`` and
:func:`~rain_adapter.evaluation.scoring.follow_instructions` (the definitions the λ sweeps use) one instruction at a time through the
server's check registry, and catches everything: a check that cannot run (bad kwargs, lm-eval's
IFEval registry without NLTK's ``punkt_tab``, a plug-in that returns None or raises) is **unscored**
with its reason — ``ok`` None and ``error`` set — and left out of compliance, never counted as
non-compliant. ``compliant`` is None when nothing was scored. :func:`probe_checks` runs at start-up
and returns a warning per check that cannot run here.

The registry (:func:`server_registry`, ``rain serve --checks MOD``) knows the built-in ids, the
``spec:*`` kinds and the modules registered at start-up, and never imports: a request naming any
other ``module:function`` is a 400 (:func:`rain_adapter.serve.requests.parse_rain_checks`). Each
parsed check carries the registry it was validated against, and is scored with it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..evaluation import checks as _checks
from ..evaluation.registry import CheckRegistry, registry_with
from ..evaluation.scoring import follow_instructions

log = logging.getLogger("rain_adapter.serve")

#: checks run once at start-up (one of them needs NLTK's sentence splitter with lm-eval's registry)
PROBES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("punctuation:no_comma", {}),
    ("length_constraints:number_sentences", {"num_sentences": 1, "relation": "at least"}),
    ("length_constraints:number_words", {"num_words": 1, "relation": "at least"}),
)


#: the registry of a server started without ``--checks`` (and of requests parsed without one)
DEFAULT_SERVER_REGISTRY = CheckRegistry(allow_import=False)


def server_registry(modules: Sequence[str] = ()) -> CheckRegistry:
    """A registry that never imports, with ``modules`` (``rain serve --checks``) registered now."""
    return registry_with(modules, allow_import=False) if modules else DEFAULT_SERVER_REGISTRY


@dataclass(frozen=True)
class OutputScore:
    """A completion's thinking-format validity and compliance with its ``rain_checks``."""

    format_valid: bool | None
    compliant: bool | None          # None without (scorable) checks
    results: list[dict[str, Any]]   # per check: {"instruction_id", "ok", "error"?}

    @property
    def unscored(self) -> int:
        """Checks that could not run on this completion."""
        return sum(1 for r in self.results if r["ok"] is None)


def _one(iid: str, kwargs: dict[str, Any] | None, text: str, registry: CheckRegistry) -> dict[str, Any]:
    try:
        _, res = follow_instructions([(iid, kwargs)], text, registry=registry)
        r = res[0]
        return {"instruction_id": iid, "ok": r.ok, **({"error": r.error} if r.error else {})}
    except Exception as e:  # noqa: BLE001 - a check that cannot run is unscored, never non-compliant
        return {"instruction_id": iid, "ok": None, "error": f"check could not run: {type(e).__name__}: {e}"[:500]}


def score_output(text: str, checks: Sequence[Any], registry: CheckRegistry | None = None) -> OutputScore:
    """Score ``text`` (``checks``: objects with ``instruction_id``, ``kwargs`` and optionally the
    ``registry`` they were validated against); ``registry`` overrides theirs (default: the server's
    default registry); see the module doc."""
    rows = [_one(c.instruction_id, c.kwargs, text,
                 registry or getattr(c, "registry", None) or DEFAULT_SERVER_REGISTRY) for c in checks]
    scored = [r["ok"] for r in rows if r["ok"] is not None]
    try:
        fv: bool | None = bool(_checks.think_format_ok(text))
    except Exception:  # noqa: BLE001
        log.exception("rain serve: think_format_ok failed")
        fv = None
    return OutputScore(fv, (all(scored) if scored else None), rows)


def probe_checks(registry: CheckRegistry | None = None) -> list[str]:
    """A warning for each probe check that cannot run in this environment (empty when all can)."""
    out = []
    for iid, kw in PROBES:
        if iid not in _checks.supported_ids():
            continue
        r = _one(iid, kw, "One sentence here. And another one.", registry or DEFAULT_SERVER_REGISTRY)
        if r["ok"] is None:
            out.append(f"check {iid} cannot run ({r.get('error')}); requests asking for it are logged unscored")
    return out


__all__ = ["DEFAULT_SERVER_REGISTRY", "OutputScore", "probe_checks", "score_output", "server_registry"]
