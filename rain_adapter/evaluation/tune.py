"""``rain tune``: find λ*, the strongest instruction following the user's floors allow.

On a dev prompt set with checks (compliance) and references (accuracy), for one adapter:

    λ* = argmax_λ compliance(λ)  subject to  accuracy(λ) ≥ a·accuracy(0)  and  format(λ) ≥ f·format(0)

with a = ``min_accuracy`` (0.90) and f = ``min_format`` (0.98) *relative to the LRM*: λ = 0 is the
LRM exactly (W + 0·D), measured on the same prompts. Only the feasible region that starts at λ = 0
counts (every evaluated λ up to it meets the floors): a feasible λ beyond an infeasible one is noise
at this n, never a recommendation. Ties in compliance go to the smaller λ (closer to the LRM).

Search (:func:`search`): the coarse grid (λ = 0 added) in one mixed-λ batch, then
``refine_rounds`` rounds that halve the step h and evaluate, in one batch, λ* ± h (a zoom when
compliance peaks inside the region) and end + h, end being the last feasible λ (a bisection of the
boundary to the first infeasible λ, where λ* lies when compliance rises with λ). The result
keeps every evaluated point with Wilson intervals, the measured ``lambda_range`` = [0, the last
feasible λ of the region] and, between neighbouring λ, the prompts per arm that would separate
their compliance (:func:`~rain_adapter.evaluation.stats.n_to_separate`).

:func:`search` is pure (it calls ``evaluate(lambdas) -> [LambdaPoint]``), so the rule is tested on
synthetic curves; :func:`tune_attached` plugs in generation + scoring on a RainModel.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..format.lambdas import LambdaRangeWarning, parse_lambdas
from .scoring import score_response
from .stats import n_to_separate, wilson
from .sweep import generate_responses

__all__ = ["LambdaPoint", "TuneError", "TuneOptions", "TuneResult", "choose", "search", "tune_attached"]


class TuneError(ValueError):
    """The dev set or the options cannot give a λ* (no checks, no references, no feasible λ > 0)."""


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TuneOptions:
    """The search and its floors; ``rain tune`` has one flag per field (``--min-accuracy`` …)."""

    grid: str = _opt("0:3:0.5", "coarse λ grid (λ = 0, the LRM, is always added)")
    refine_rounds: int = _opt(3, "rounds that halve the step around λ* (resolution: step / 2**rounds)")
    min_accuracy: float = _opt(0.90, "accuracy floor as a share of the LRM's (0: no floor)")
    min_format: float = _opt(0.98, "thinking-format validity floor as a share of the LRM's (0: no floor)")
    confidence: float = _opt(0.95, "level of the reported Wilson intervals")
    floor_on: str = _opt("estimate", "estimate: a λ meets a floor when its measured rate does; lower: when the "
                         "Wilson lower bound at --confidence does (conservative on small dev sets)")
    max_new_tokens: int = _opt(256, "tokens generated per response")
    batch_size: int = _opt(64, "rows per generate call (several λ mixed in one batch)")

    def validate(self) -> None:
        for name in ("min_accuracy", "min_format"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise TuneError(f"tune: {name} must lie in [0, 1] (a share of the LRM's value), got {v!r}")
        if self.floor_on not in ("estimate", "lower"):
            raise TuneError(f"tune: floor_on must be 'estimate' or 'lower', got {self.floor_on!r}")
        if not 0 <= self.refine_rounds <= 10:
            raise TuneError(f"tune: refine_rounds must lie in [0, 10], got {self.refine_rounds}")
        grid = self.lambdas()
        if len(grid) < 2:
            raise TuneError(f"tune: the grid {self.grid!r} needs at least one λ besides 0")

    def lambdas(self) -> list[float]:
        """The coarse grid, sorted, with λ = 0."""
        return sorted({0.0, *parse_lambdas(self.grid, what="--grid")})

    def step(self) -> float:
        """The coarse step: the smallest gap of the grid."""
        g = self.lambdas()
        return min(b - a for a, b in zip(g, g[1:]))


@dataclass
class LambdaPoint:
    """Counts at one λ: successes / scored prompts for compliance, accuracy and format validity."""

    lam: float
    comply_k: int
    comply_n: int
    acc_k: int
    acc_n: int
    fmt_k: int
    fmt_n: int
    unscored: int = 0   # rows with a check or an answer that could not be scored (left out of the n above)
    unscored_reasons: dict[str, int] = field(default_factory=dict)   # "check: reason" -> rows

    @staticmethod
    def _rate(k: int, n: int) -> float:
        return k / n if n else float("nan")

    @property
    def compliance(self) -> float:
        return self._rate(self.comply_k, self.comply_n)

    @property
    def accuracy(self) -> float:
        return self._rate(self.acc_k, self.acc_n)

    @property
    def format_validity(self) -> float:
        return self._rate(self.fmt_k, self.fmt_n)

    def to_dict(self, confidence: float = 0.95) -> dict[str, Any]:
        d: dict[str, Any] = {"lambda": self.lam, **{k: v for k, v in asdict(self).items() if k != "lam"}}
        for name, k, n in (("compliance", self.comply_k, self.comply_n), ("accuracy", self.acc_k, self.acc_n),
                           ("format_validity", self.fmt_k, self.fmt_n)):
            # a rate nothing was scored for (no references: --min-accuracy 0) is JSON null, never NaN
            d[name] = self._rate(k, n) if n else None
            d[name + "_ci"] = list(wilson(k, n, confidence)) if n else None
        return d


@dataclass
class TuneResult:
    """Every evaluated point, the floors, λ* and the measured range."""

    points: list[LambdaPoint]
    floors: dict[str, float]          # absolute: {"accuracy": a·acc(0), "format_validity": f·fmt(0)}
    best: LambdaPoint
    lambda_range: tuple[float, float]
    feasible: dict[float, bool] = field(default_factory=dict)
    confidence: float = 0.95

    @property
    def recommended_lambda(self) -> float:
        return self.best.lam

    @property
    def baseline(self) -> LambdaPoint:
        return self.points[0]

    def neighbours_n(self) -> list[dict[str, float]]:
        """Per pair of neighbouring λ: prompts per arm that would separate their compliance."""
        ps = self.points
        return [{"lambda_a": a.lam, "lambda_b": b.lam, "n_per_arm": n_to_separate(a.compliance, b.compliance)}
                for a, b in zip(ps, ps[1:])]

    def to_dict(self) -> dict[str, Any]:
        return {"recommended_lambda": self.best.lam, "lambda_range": list(self.lambda_range),
                "floors": self.floors, "confidence": self.confidence,
                "points": [{**p.to_dict(self.confidence), "feasible": self.feasible[p.lam]} for p in self.points],
                "n_to_separate": [{**d, "n_per_arm": None if math.isinf(d["n_per_arm"]) else d["n_per_arm"]}
                                  for d in self.neighbours_n()]}

    def format_table(self, name: str = "") -> str:
        """The curve as a text table, λ* marked, with intervals and the n that separates neighbours."""
        pct = int(round(self.confidence * 100))
        head = (f"{'λ':>6}  {'compliance':>10} {f'[{pct}% CI]':>13}  {'accuracy':>8} {f'[{pct}% CI]':>13}  "
                f"{'format':>6}  {'ok':>3}  {'n to separate from next':>24}")
        lines = ([f"{name}: λ* = {self.best.lam:g}, measured range [{self.lambda_range[0]:g}, "
                  f"{self.lambda_range[1]:g}]"] if name else []) + [head, "-" * len(head)]
        seps = {d["lambda_a"]: d["n_per_arm"] for d in self.neighbours_n()}
        for p in self.points:
            c_lo, c_hi = wilson(p.comply_k, p.comply_n, self.confidence)
            a_lo, a_hi = wilson(p.acc_k, p.acc_n, self.confidence)
            sep = seps.get(p.lam)
            sep_s = "" if sep is None else ("∞ (equal)" if math.isinf(sep) else f"{int(sep)}")
            mark = "*" if p.lam == self.best.lam else ""
            lines.append(f"{p.lam:>6g}{mark:1} {p.compliance:>10.3f} [{c_lo:.2f}, {c_hi:.2f}]  {p.accuracy:>8.3f} "
                         f"[{a_lo:.2f}, {a_hi:.2f}]  {p.format_validity:>6.3f}  "
                         f"{'yes' if self.feasible[p.lam] else 'no':>3}  {sep_s:>24}")
        return "\n".join(lines)


def _floors(base: LambdaPoint, opts: TuneOptions) -> dict[str, float]:
    """Absolute floors from the LRM's (λ = 0) values; errors when a floor cannot be checked."""
    if base.comply_n == 0:
        raise TuneError("tune: no prompt of the dev set carries a check that could be scored, so compliance "
                        "cannot be measured; give prompts with instruction_id_list / checks")
    floors: dict[str, float] = {}
    if opts.min_accuracy > 0:
        if base.acc_n == 0:
            raise TuneError("tune: no prompt of the dev set has an 'answer', so the accuracy floor cannot be "
                            "checked; add references or pass --min-accuracy 0 to tune on compliance and format")
        floors["accuracy"] = round(opts.min_accuracy * base.accuracy, 12)
    if opts.min_format > 0:
        floors["format_validity"] = round(opts.min_format * base.format_validity, 12)
    return floors


_COUNTS = {"accuracy": ("acc_k", "acc_n"), "format_validity": ("fmt_k", "fmt_n")}


def _meets(p: LambdaPoint, floors: dict[str, float], lower: float | None = None) -> bool:
    """Every floor met by the rate, or with ``lower`` (a confidence) by its Wilson lower bound."""
    eps = 1e-12  # a tiny slack so that "≥ 98 % of 1.0" is met by 0.98 computed in floating point
    for k, v in floors.items():
        rate = getattr(p, k)
        if lower is not None:
            kk, nn = (getattr(p, a) for a in _COUNTS[k])
            rate = wilson(kk, nn, lower)[0] if nn else float("nan")
        if not rate >= v - eps:
            return False
    return True


def choose(points: Sequence[LambdaPoint], floors: dict[str, float], *, lower: float | None = None
           ) -> tuple[LambdaPoint, float, dict[float, bool]]:
    """(λ* point, end of the feasible region from λ = 0, feasibility per λ); see the module doc.
    ``lower``: judge the floors on the Wilson lower bound at this confidence (``floor_on="lower"``)."""
    pts = sorted(points, key=lambda p: p.lam)
    feasible = {p.lam: (p.lam == 0.0 or _meets(p, floors, lower)) for p in pts}
    region = [pts[0]]
    for p in pts[1:]:
        if not feasible[p.lam]:
            break
        region.append(p)
    # highest compliance, then the smaller λ (region is sorted, max keeps the first of equals)
    best = max(region, key=lambda p: p.compliance if p.compliance == p.compliance else -1.0)
    return best, region[-1].lam, feasible


def search(evaluate: Callable[[list[float]], list[LambdaPoint]], opts: TuneOptions,
           on_round: Callable[[str], None] | None = None) -> TuneResult:
    """Coarse grid, then ``refine_rounds`` rounds of λ* ± h (h halving); see the module doc."""
    opts.validate()
    grid = opts.lambdas()
    lo, hi = grid[0], grid[-1]
    if lo > 0 or lo < 0:
        raise TuneError(f"tune: the grid must start at λ = 0 (the LRM) and go up, got {grid}")
    points = {p.lam: p for p in evaluate(grid)}
    floors = _floors(points[0.0], opts)
    lower = opts.confidence if opts.floor_on == "lower" else None
    h = opts.step()
    for r in range(opts.refine_rounds):
        best, end, _ = choose(list(points.values()), floors, lower=lower)
        h /= 2
        # λ* ± h zooms in on a compliance peak; end + h bisects the gap between the last feasible λ
        # and the first infeasible one, where λ* lies when compliance rises with λ (even while the
        # region's compliance is still flat, e.g. all 0, and λ* is the tie-broken smallest λ)
        cands = [best.lam - h, best.lam + h] + ([end + h] if end < hi else [])
        cands = sorted({round(x, 9) for x in cands if lo <= x <= hi} - set(points))
        if cands:
            points.update({p.lam: p for p in evaluate(cands)})
        if on_round:
            new_best = choose(list(points.values()), floors, lower=lower)[0]
            on_round(f"round {r + 1}: evaluated {cands or 'nothing new'}; λ* = {new_best.lam:g}")
    best, region_end, feasible = choose(list(points.values()), floors, lower=lower)
    return TuneResult(points=sorted(points.values(), key=lambda p: p.lam), floors=floors, best=best,
                      lambda_range=(0.0, region_end), feasible=feasible, confidence=opts.confidence)


def point_from_scores(lam: float, scores: Sequence[dict[str, Any]]) -> LambdaPoint:
    """Counts of one λ from per-row scores (``follow_all``, ``correct``: bool or None; ``think_ok``: bool)."""
    follow = [s["follow_all"] for s in scores if s.get("follow_all") is not None]
    correct = [s["correct"] for s in scores if s.get("correct") is not None]
    fmt = [s["think_ok"] for s in scores if s.get("think_ok") is not None]
    unscored = sum(1 for s in scores if s.get("unscored"))
    reasons = Counter(f"{u['check']}: {u['reason']}"[:200] for s in scores for u in s.get("unscored") or ())
    return LambdaPoint(float(lam), sum(map(bool, follow)), len(follow), sum(map(bool, correct)), len(correct),
                       sum(map(bool, fmt)), len(fmt), unscored, dict(reasons.most_common(5)))


def tune_attached(rain_model, tokenizer, rows: Sequence[dict[str, Any]], opts: TuneOptions, *,
                  score: Callable[[dict[str, Any], str], dict[str, Any]] | None = None, progress: bool = True,
                  on_responses: Callable[[list[dict[str, Any]]], None] | None = None,
                  on_round: Callable[[str], None] | None = None) -> TuneResult:
    """:func:`search` with generation on ``rain_model`` (one mixed-λ batch per round) and scoring by
    ``score(row, response)`` (default :func:`rain_adapter.evaluation.scoring.score_response`).

    ``on_responses`` gets each round's responses ``{lambda, index, prompt, response}`` before they are
    scored (``rain tune`` appends them to ``responses.jsonl``, so a scoring failure loses nothing)."""
    score = score or score_response

    def evaluate(lams: list[float]) -> list[LambdaPoint]:
        pairs = [(lam, i) for lam in lams for i in range(len(rows))]
        with warnings.catch_warnings():  # the grid may go past the build's advisory range on purpose
            warnings.filterwarnings("ignore", category=LambdaRangeWarning)
            resp = generate_responses(rain_model, tokenizer, [rows[i]["prompt"] for _, i in pairs],
                                      lambdas=[lam for lam, _ in pairs], max_new_tokens=opts.max_new_tokens,
                                      batch_size=opts.batch_size, progress=progress,
                                      desc=f"tune λ {', '.join(f'{x:g}' for x in lams)}")
        if on_responses is not None:  # handed out before anything is scored
            on_responses([{"lambda": lam, "index": i, "prompt": rows[i]["prompt"], "response": r}
                          for (lam, i), r in zip(pairs, resp)])
        out = []
        for lam in lams:
            scores = [score(rows[i], r) for (la, i), r in zip(pairs, resp) if la == lam]
            out.append(point_from_scores(lam, scores))
        return out

    return search(evaluate, opts, on_round=on_round)
