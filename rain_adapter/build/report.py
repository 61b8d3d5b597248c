"""What ``rain build`` tells the user: the per-module Stage 1 table, the build log, the timings.

Log lines go to stderr (prefixed ``[rain build]``), the stats table to stdout; both only when
``verbose``. The timings end up in ``config.extra["build_seconds"]``.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def format_stats_table(stats: dict[str, dict]) -> str:
    """Per module: rows, protected rank, residual ‖Δ⊥X‖/‖ΔX‖ next to kept norm ‖Δ⊥‖/‖Δ‖."""
    lines = [f"{'module':<44} {'rows':>6} {'prot.rank':>9} {'residual':>10} {'kept norm':>10}"]
    for n, s in stats.items():
        if "residual" in s:
            lines.append(f"{n:<44} {s['rows']:>6} {s['protected_rank']:>9} {s['residual']:>10.3e} {s['kept_norm']:>10.4f}")
        else:
            lines.append(f"{n:<44} {'-':>6} {'-':>9} {'-':>10} {s.get('kept_norm', float('nan')):>10.4f}")
    res = [s["residual"] for s in stats.values() if "residual" in s]
    kept = [s["kept_norm"] for s in stats.values() if "kept_norm" in s]
    if kept:
        lines.append(f"{'overall':<44} {'':>6} {'':>9} {(max(res) if res else float('nan')):>10.3e} "
                     f"{sum(kept) / len(kept):>10.4f}   (max residual, mean kept norm)")
    return "\n".join(lines)


def calibration_line(info: dict[str, Any]) -> str:
    return (f"[rain build] calibration: {info['n_samples']} samples, {info['n_positions']} "
            f"thinking positions (skipped {info['skipped']})")


def done_line(out: Any, method: str, n_modules: int, storage: str, seconds: float) -> str:
    return f"[rain build] wrote {out} ({method}, {n_modules} modules, {storage}) in {seconds:.1f} s"


class BuildLog:
    """The build's log and clock: ``log(msg)`` prints when verbose; ``mark(name)`` records the
    seconds since the previous mark (stage1 = start → layers assembled, stage2 = → after Stage 2)."""

    def __init__(self, verbose: bool = True) -> None:
        self.verbose = verbose
        self.t_start = time.perf_counter()
        self._t_last = self.t_start
        self.marks: dict[str, float] = {}

    def __call__(self, msg: str) -> None:
        if self.verbose:
            print(msg, file=sys.stderr, flush=True)

    def table(self, stats: dict[str, dict]) -> None:
        if self.verbose:
            print(format_stats_table(stats), flush=True)

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.marks[name] = now - self._t_last
        self._t_last = now

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def seconds(self) -> dict[str, float]:
        """``{<mark>: s, ..., "total": s}`` rounded to ms (``config.extra["build_seconds"]``)."""
        return {**{k: round(v, 3) for k, v in self.marks.items()}, "total": round(self.elapsed(), 3)}
