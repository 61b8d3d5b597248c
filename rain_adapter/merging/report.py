"""What ``rain build`` tells the user: the per-module Stage 1 table (one line instead for a method
that does not project), the build log, the timings.

Log lines go to stderr (prefixed ``[rain build]``), the stats table to stdout; both only when
``verbose``. Warnings (:meth:`BuildLog.warn`) are printed whatever ``verbose`` says, raised as a
Python warning of a named :class:`~rain_adapter.merging.errors.BuildWarning` class, and recorded.
The timings end up in ``config.extra["build_seconds"]``.

:func:`kept_norm_check` looks at Stage 1's result: the overall kept norm
sqrt(Σ‖Δ⊥‖²) / sqrt(Σ‖Δ‖²) over every module (each module's stats carry ``task_norm`` = ‖Δ‖_F and
``kept_norm`` = ‖Δ⊥‖/‖Δ‖), and how many projected modules are (near) zero. With
``--protect-energy 1.0`` (or ``--projection exact``) and many more thinking positions than a
module's width, the projection removes almost all of Δ; the build then says so loudly.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from typing import Any

from .errors import BuildWarning

#: overall kept norm below which the build warns that Stage 1 left (almost) nothing of Δ
KEPT_NORM_WARN_TOTAL = 0.05
#: a projected module whose kept norm is below this counts as (near) zero; more than half of
#: them near zero is also warned about
KEPT_NORM_ZERO = 0.01


def format_stats_table(stats: dict[str, dict]) -> str:
    """Per module: rows, protected rank, residual ‖Δ⊥X‖/‖ΔX‖ next to kept norm ‖Δ⊥‖/‖Δ‖ (``-``
    where a module has no such value, e.g. a layer outside ``--project-layers``; never ``nan``).
    For the Stage 1 of a projecting method; a method without one prints
    :func:`stage1_skipped_line` instead."""
    lines = [f"{'module':<44} {'rows':>6} {'prot.rank':>9} {'residual':>10} {'kept norm':>10}"]
    for n, s in stats.items():
        kept_s = f"{s['kept_norm']:>10.4f}" if "kept_norm" in s else f"{'-':>10}"
        if "residual" in s:
            lines.append(f"{n:<44} {s['rows']:>6} {s['protected_rank']:>9} {s['residual']:>10.3e} {kept_s}")
        else:
            lines.append(f"{n:<44} {'-':>6} {'-':>9} {'-':>10} {kept_s}")
    res = [s["residual"] for s in stats.values() if "residual" in s]
    kept = [s["kept_norm"] for s in stats.values() if "kept_norm" in s]
    if kept:
        res_s = f"{max(res):>10.3e}" if res else f"{'-':>10}"
        lines.append(f"{'overall':<44} {'':>6} {'':>9} {res_s} "
                     f"{sum(kept) / len(kept):>10.4f}   (max residual, mean kept norm)")
    return "\n".join(lines)


def stage1_skipped_line(method: str, stats: dict[str, dict]) -> str:
    """The one line ``rain build`` prints instead of the Stage 1 table for a method that does not
    project (task-arithmetic, ties, dare-ties): with the share of ‖Δ‖ its transform kept overall
    (:func:`kept_norm_total`) when there is one."""
    total = kept_norm_total(stats)
    kept = f"; its transform kept {total:.1%} of the task vector's norm" if total is not None else ""
    return f"[rain build] Stage 1: skipped (method {method} does not project{kept})"


def kept_norm_total(stats: dict[str, dict]) -> float | None:
    """sqrt(Σ‖Δ⊥‖²) / sqrt(Σ‖Δ‖²) over the modules whose stats carry ``task_norm``; None without any."""
    pairs = [(float(s["task_norm"]), float(s.get("kept_norm", 0.0))) for s in stats.values() if "task_norm" in s]
    total = sum(t * t for t, _ in pairs)
    if not pairs or total <= 0:
        return None
    return math.sqrt(sum((t * k) ** 2 for t, k in pairs) / total)


def kept_norm_check(stats: dict[str, dict], hint: str = "") -> tuple[float | None, str | None]:
    """(overall kept norm, a warning or None). Warns when the overall kept norm is below
    :data:`KEPT_NORM_WARN_TOTAL` or more than half of the projected modules (those with a
    ``residual``; a module whose Δ is zero does not count) keep less than :data:`KEPT_NORM_ZERO`.
    ``hint``: the settings that led there, for the message."""
    total = kept_norm_total(stats)
    projected = [s for s in stats.values() if "residual" in s and s.get("task_norm", 1.0) > 0]
    zero = [s for s in projected if s["kept_norm"] < KEPT_NORM_ZERO]
    if not projected or not ((total is not None and total < KEPT_NORM_WARN_TOTAL) or 2 * len(zero) > len(projected)):
        return total, None
    kept = f"{total:.1%}" if total is not None else "?"
    empty = "the adapter is almost empty" if total is not None and total < KEPT_NORM_WARN_TOTAL else \
        "most projected modules carry nothing"
    msg = (f"Stage 1 kept {kept} of the task vector's norm overall and left {len(zero)} of {len(projected)} "
           f"projected modules (near) zero (kept norm < {KEPT_NORM_ZERO}): {empty}"
           + (f" ({hint})" if hint else "") + ". The thinking positions span (almost) every input direction of "
           "those modules; lower --protect-energy (e.g. 0.95; --projection exact is hard at 1.0), use fewer "
           "calibration samples (--max-samples), or use --projection ridge")
    return total, msg


def calibration_line(info: dict[str, Any]) -> str:
    return (f"[rain build] calibration: {info['n_samples']} samples, {info['n_positions']} "
            f"thinking positions (skipped {info['skipped']})")


#: how :func:`done_line` names the build's phases (:class:`BuildLog` marks)
PHASE_LABELS = {"stage1": "stage 1", "stage2": "stage 2"}


def done_line(out: Any, method: str, n_modules: int, storage: str, seconds: float,
              phases: dict[str, float] | None = None) -> str:
    """``[rain build] wrote OUT (...) in S s total wall time (preflight a s, load b s, ...)``:
    ``seconds`` is the whole build (:meth:`BuildLog.elapsed`), ``phases`` its marks."""
    line = f"[rain build] wrote {out} ({method}, {n_modules} modules, {storage}) in {seconds:.1f} s total wall time"
    if phases:
        line += " (" + ", ".join(f"{PHASE_LABELS.get(k, k)} {v:.1f} s" for k, v in phases.items()) + ")"
    return line


class BuildLog:
    """The build's log and clock: ``log(msg)`` prints when verbose; ``mark(name)`` records the
    seconds since the previous mark. ``build_adapter`` starts the clock (``t_start``) on entry,
    before the options are resolved, and marks preflight = → the input checks done (options,
    output directory, configs, tokenizer and calibration, checkpoint headers), load = → the LRM
    loaded (or its skeleton and fingerprint), stage1 = → layers assembled, stage2 = → after
    Stage 2, write = → the adapter written; the marks add up to :meth:`elapsed`."""

    #: the clock the build uses (``t_start`` values come from it)
    now = staticmethod(time.perf_counter)

    def __init__(self, verbose: bool = True, t_start: float | None = None) -> None:
        self.verbose = verbose
        self.t_start = self.now() if t_start is None else t_start
        self._t_last = self.t_start
        self.marks: dict[str, float] = {}
        self.warnings: list[str] = []

    def __call__(self, msg: str) -> None:
        if self.verbose:
            print(msg, file=sys.stderr, flush=True)

    def warn(self, msg: str, category: type[BuildWarning] = BuildWarning) -> None:
        """Print ``[rain build] WARNING: msg`` (even when not verbose), record it in
        :attr:`warnings`, and raise it as a Python warning of ``category``."""
        self.warnings.append(msg)
        print(f"[rain build] WARNING: {msg}", file=sys.stderr, flush=True)
        warnings.warn(msg, category, stacklevel=3)

    def table(self, stats: dict[str, dict]) -> None:
        if self.verbose:
            print(format_stats_table(stats), flush=True)

    def mark(self, name: str) -> None:
        now = self.now()
        self.marks[name] = now - self._t_last
        self._t_last = now

    def elapsed(self) -> float:
        """Seconds since the clock started (the start of ``build_adapter``)."""
        return self.now() - self.t_start

    def seconds(self) -> dict[str, float]:
        """``{<mark>: s, ..., "total": s}`` rounded to ms (``config.extra["build_seconds"]``, taken
        when the config is made: every mark but ``write``, and the total up to then)."""
        return {**{k: round(v, 3) for k, v in self.marks.items()}, "total": round(self.elapsed(), 3)}
