"""A/B report over the request log: per arm rates and latencies with 95% intervals.

- proportions (format validity, compliance): Wilson score interval,
  (p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n), z = 1.96;
- mean feedback: normal interval mean ± 1.96·s/√n;
- latency p50 / p99: percentile bootstrap (1000 resamples, fixed seed);
- arm vs arm: two-proportion z-test with pooled p, z = (p₁ − p₂)/sqrt(p(1−p)(1/n₁ + 1/n₂)),
  two-sided p-value = erfc(|z|/√2).
Only rows with status "ok" count (``n_by_status`` counts every status). Requests with an explicit
``rain_lambda`` are their own arm per λ value (``λ=0.6``). A value that is not a finite number
(latency, feedback, λ) is skipped and counted in ``skipped_values``; a check that could not run is
counted in ``unscored`` per arm, never as non-compliant. With an adaptive policy's allocation log,
each arm also shows its Beta posterior (mean, 95% interval) — from the rewards the policy counted
(the rows' ``reward``, ``serve/rewards.py``) — and its latest allocation, and ``reward_notes``
counts the ``ok`` rows that gave no reward, by reason. The JSON
never holds NaN or Infinity (:func:`to_json` sanitises, then dumps with ``allow_nan=False``).
"""

from __future__ import annotations

import collections
import itertools
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .metrics_db import MetricsDB
from .thompson import beta_summary, reward_of

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float | None, float | None, float | None]:
    """(p̂, low, high); Nones when n == 0."""
    if n <= 0:
        return None, None, None
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # The interval always contains p̂; clamp so float round-off at p̂ = 0 or 1 (k = 0 gives
    # centre - half ≈ 3e-17) cannot put p̂ outside it (negative error bars in the plot).
    return p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def mean_ci(x: Sequence[float], z: float = Z95) -> tuple[float | None, float | None, float | None]:
    a = np.asarray([v for v in x if v is not None], dtype=np.float64)
    if a.size == 0:
        return None, None, None
    m = float(a.mean())
    if a.size == 1:
        return m, None, None
    h = z * float(a.std(ddof=1)) / math.sqrt(a.size)
    return m, m - h, m + h


def percentile_ci(x: Sequence[float], q: float, n_boot: int = 1000, seed: int = 0
                  ) -> tuple[float | None, float | None, float | None]:
    a = np.asarray([v for v in x if v is not None], dtype=np.float64)
    if a.size == 0:
        return None, None, None
    est = float(np.percentile(a, q))
    if a.size == 1:
        return est, None, None
    rng = np.random.default_rng(seed)
    boots = np.percentile(a[rng.integers(0, a.size, size=(n_boot, a.size))], q, axis=1)
    return est, float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> tuple[float | None, float | None]:
    """(z, two-sided p); Nones when undefined (an empty arm, or pooled p ∈ {0, 1})."""
    if n1 == 0 or n2 == 0:
        return None, None
    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return None, None
    z = (k1 / n1 - k2 / n2) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def _ci(t: tuple) -> dict[str, Any]:
    return {"value": t[0], "ci95": [t[1], t[2]]}


def _finite(rs: list[dict], key: str, skipped: dict[str, int]) -> list[float]:
    """The finite numbers under ``key``; anything else that is not None is counted in ``skipped``."""
    out = []
    for r in rs:
        v = r.get(key)
        if v is None:
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
        else:
            skipped[key] = skipped.get(key, 0) + 1
    return out


def _flags(rs: list[dict], key: str, skipped: dict[str, int]) -> list[int]:
    """0/1 values under ``key`` (anything else but None skipped and counted)."""
    out = []
    for r in rs:
        v = r.get(key)
        if v in (0, 1, True, False):
            out.append(int(v))
        elif v is not None:
            skipped[key] = skipped.get(key, 0) + 1
    return out


def _unscored(rs: list[dict]) -> int:
    n = 0
    for r in rs:
        v = r.get("unscored")
        n += int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0
    return n


def ab_report(rows: list[dict[str, Any]], allocations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per-arm summary and pairwise tests from :meth:`MetricsDB.rows` output (never fails on a row)."""
    ok = [r for r in rows if isinstance(r, dict) and r.get("status") == "ok"]
    by_status: dict[str, int] = {}
    for r in rows:
        st = str(r.get("status")) if isinstance(r, dict) else "?"
        by_status[st] = by_status.get(st, 0) + 1
    arms: dict[str, list[dict]] = {}
    for r in ok:
        arms.setdefault(str(r.get("arm") or "?"), []).append(r)
    per_arm: dict[str, Any] = {}
    counts: dict[str, dict[str, tuple[int, int]]] = {}
    skipped: dict[str, int] = {}
    for name, rs in sorted(arms.items()):
        lams = sorted(set(_finite(rs, "lam", skipped)))
        fv = _flags(rs, "format_valid", skipped)
        cp = _flags(rs, "compliant", skipped)
        fb = _finite(rs, "feedback", skipped)
        lat = _finite(rs, "latency_s", skipped)
        ttft = _finite(rs, "ttft_s", skipped)
        counts[name] = {"format_valid": (int(sum(fv)), len(fv)), "compliant": (int(sum(cp)), len(cp))}
        per_arm[name] = {
            "n": len(rs),
            "lambda": lams[0] if len(lams) == 1 else lams,
            "format_valid_rate": {**_ci(wilson(int(sum(fv)), len(fv))), "n": len(fv)},
            "compliance_rate": {**_ci(wilson(int(sum(cp)), len(cp))), "n": len(cp)},
            "mean_feedback": {**_ci(mean_ci(fb)), "n": len(fb)},
            "latency_p50_s": _ci(percentile_ci(lat, 50)),
            "latency_p99_s": _ci(percentile_ci(lat, 99)),
            "ttft_p50_s": _ci(percentile_ci(ttft, 50)),
            "unscored": _unscored(rs),
        }
    tests = []
    for a, b in itertools.combinations(sorted(per_arm), 2):
        for metric in ("format_valid", "compliant"):
            (k1, n1), (k2, n2) = counts[a][metric], counts[b][metric]
            z, p = two_proportion_z(k1, n1, k2, n2)
            tests.append({"arm_a": a, "arm_b": b, "metric": metric, "z": z, "p_value": p})
    rep = {"n_total": len(ok), "n_failed": len(rows) - len(ok), "n_by_status": by_status, "arms": per_arm,
           "tests": tests, "skipped_values": skipped}
    if allocations:
        rep["posterior"] = posterior_table(ok, allocations[-1].get("allocation") or {})
        rep["allocation_changes"] = len(allocations)
    notes = collections.Counter(str(r["reward_note"]) for r in ok if r.get("reward_note"))
    if allocations or notes:
        rep["reward_notes"] = dict(sorted(notes.items()))
    return rep


def posterior_table(ok_rows: list[dict[str, Any]], allocation: dict[str, float]) -> dict[str, Any]:
    """Per arm of the latest allocation: Beta posterior (mean, 95% interval) of the reward and the allocation."""
    rng = np.random.default_rng(0)
    out = {}
    for arm, share in allocation.items():
        rewards = [reward_of(r) for r in ok_rows if r.get("arm") == arm]
        s = sum(1 for x in rewards if x is True)
        f = sum(1 for x in rewards if x is False)
        out[arm] = {**beta_summary(s, f, rng), "allocation": share}
    return out


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.3g}"


def _fmt_ci(d: dict, pct: bool = False) -> str:
    lo, hi = d["ci95"]
    if d["value"] is None:
        return "-"
    return f"{_fmt(d['value'], pct)} [{_fmt(lo, pct)}, {_fmt(hi, pct)}]"


def format_report(rep: dict[str, Any]) -> str:
    """A plain-text table of :func:`ab_report`."""
    by = ", ".join(f"{k} {v}" for k, v in sorted(rep.get("n_by_status", {}).items()) if k != "ok")
    lines = [f"requests: {rep['n_total']} ok, {rep['n_failed']} not ok" + (f" ({by})" if by else ""), "",
             f"{'arm':<14}{'λ':>6}{'n':>7}  {'format valid':<26}{'compliance':<26}{'feedback':<24}"
             f"{'p50 latency s':<24}{'p99 latency s':<24}"]
    for name, a in rep["arms"].items():
        lam = a["lambda"] if not isinstance(a["lambda"], list) else "mixed"
        lines.append(f"{name:<14}{str(lam):>6}{a['n']:>7}  {_fmt_ci(a['format_valid_rate'], True):<26}"
                     f"{_fmt_ci(a['compliance_rate'], True):<26}{_fmt_ci(a['mean_feedback']):<24}"
                     f"{_fmt_ci(a['latency_p50_s']):<24}{_fmt_ci(a['latency_p99_s']):<24}")
    for name, a in rep["arms"].items():
        if a.get("unscored"):
            lines.append(f"  {name}: {a['unscored']} checks unscored (could not run)")
    if rep.get("posterior"):
        lines += ["", "posterior (rewards counted: server-assigned arms, the operator's reward checks, else "
                      "feedback > 0):"]
        for name, p in rep["posterior"].items():
            lines.append(f"  {name:<14} mean {p['mean']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]  "
                         f"allocation {100 * p['allocation']:.1f}%  ({p['successes']}/{p['successes'] + p['failures']})")
    if rep.get("reward_notes"):
        lines.append("rows that gave the adaptive arms no reward: "
                     + ", ".join(f"{k} {v}" for k, v in rep["reward_notes"].items()))
    if rep.get("skipped_values"):
        lines.append(f"skipped non-finite values: {rep['skipped_values']}")
    if rep["tests"]:
        lines += ["", "two-proportion z-tests:"]
        for t in rep["tests"]:
            lines.append(f"  {t['arm_a']} vs {t['arm_b']} [{t['metric']}]: z={_fmt(t['z'])} p={_fmt(t['p_value'])}")
    return "\n".join(lines)


def plot_report(rep: dict[str, Any], out: str | Path) -> Path:
    """PNG: format-validity and compliance rate per arm with 95% Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rep["arms"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in ((axes[0], "format_valid_rate", "thinking format valid"),
                           (axes[1], "compliance_rate", "instruction compliance")):
        xs, ys, err = [], [], [[], []]
        for i, n in enumerate(names):
            d = rep["arms"][n][key]
            if d["value"] is None:
                continue
            xs.append(i)
            ys.append(d["value"])
            err[0].append(d["value"] - d["ci95"][0])
            err[1].append(d["ci95"][1] - d["value"])
        ax.bar(xs, ys, yerr=err, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([f"{n}\nλ={rep['arms'][n]['lambda']}" for n in names], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.set_ylabel("rate (95% Wilson CI)")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def report_from_db(db_path: str | Path) -> dict[str, Any]:
    p = Path(db_path)
    if not p.exists():
        raise FileNotFoundError(f"rain ab report: no request log at {p}")
    db = MetricsDB(p, synchronous="NORMAL")
    try:
        return ab_report(db.rows(), db.allocations())
    finally:
        db.close()


def sanitise(v: Any) -> Any:
    """``v`` with every non-finite float replaced by None (recursively)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): sanitise(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [sanitise(x) for x in v]
    if isinstance(v, np.generic):
        return sanitise(v.item())
    return v


def to_json(rep: dict[str, Any]) -> str:
    """Strict JSON (no NaN / Infinity)."""
    return json.dumps(sanitise(rep), indent=2, allow_nan=False, ensure_ascii=False)
