"""``rain demo --world smollm2``: RAIN on a real pretrained transformer, end to end on a CPU.

1. train (or reuse) the SmolLM2 triple (:mod:`rain_adapter.demo.real_train`);
2. soundness on held-out prompts: the LRM thinks (format validity) and solves (accuracy, against B's),
   the ITM complies on held-out phrasings; a world that fails :data:`GATE` stops unless ``allow_unsound``;
3. build every :data:`VARIANTS` adapter with :func:`rain_adapter.merging.pipeline.build_adapter` (the
   packaged calibration sets, and for RAIN / RAIN-stage1 also the world's own; RAIN stored low-rank at
   r 16 / 64 too);
4. λ sweep on the *test* split (held-out problems × constraints in held-out phrasings, two constraint
   types never trained), λ* per method by :func:`rain_adapter.evaluation.tune.tune_attached` on the
   disjoint *dev* split, then the test split at λ*;
5. the table: per method compliance / accuracy / format at λ* with Wilson intervals and n, the gap
   closed, accuracy at equal compliance, and a paired bootstrap of RAIN − task arithmetic there;
   ``sweep.png`` (metrics vs λ, format and accuracy vs compliance: the Pareto view), ``summary.json``.

Every generation is cached under ``<world>/study/`` per (adapter, λ, split), keyed by the SHA-256 of
the adapter's files, the prompt file and the generation settings; an entry whose key differs is
regenerated, so a second run reuses what matches and prints the same table.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..evaluation.plots import NO_PLOT_HINT, plot_sweep_if_available
from ..evaluation.scoring import aggregate, score_response
from ..evaluation.stats import wilson
from ..evaluation.sweep import generate_responses, load_model, load_prompts
from ..evaluation.tune import LambdaPoint, TuneOptions, point_from_scores, search
from ..format.lambdas import LambdaRangeWarning
from ..format.paths import calibration_dir
from ..merging.methods import get_method
from ..merging.pipeline import build_adapter
from ..runtime.model import RainAdapter
from .run import value_at_compliance
from .real_train import RealWorldConfig, RealWorldPaths, ci_config, ensure_real_world, recorded_sha256, weights_sha256

#: the world must show this before its table means anything (the issue's goals are reported, not gated)
GATE = {"min_format": 0.9, "min_acc_ratio": 1.5, "min_itm": 0.5, "max_lrm_compliance": 0.5}
BOOTSTRAP = 2000


@dataclass(frozen=True)
class Variant:
    """One adapter of the comparison: a build ``method``, its calibration (``packaged`` or ``world``) and
    other build ``options`` (storage, Stage 1's radius …)."""

    name: str
    method: str
    calib: str = "packaged"
    options: dict[str, Any] = field(default_factory=dict)
    tune: bool = True   # λ* searched on dev and the λ grid swept on test; False: test at RAIN's λ* only


VARIANTS = (
    Variant("rain", "rain"), Variant("rain-stage1", "rain-stage1"), Variant("task-arithmetic", "task-arithmetic"),
    Variant("ties", "ties"), Variant("dare-ties", "dare-ties"),
    Variant("rain@world-calib", "rain", "world"),
    Variant("rain r16", "rain", options={"storage": "lowrank", "rank": 16}, tune=False),
    Variant("rain r64", "rain", options={"storage": "lowrank", "rank": 64}, tune=False),
    # this world's answers ("The answer is 12.") lie within Stage 1's default radius of 5 tokens after
    # </think>, so the projection also protects the answer's own features; radius 1 protects the markers only
    Variant("rain radius-1", "rain", options={"radius": 1}),
)


@dataclass(frozen=True)
class StudyOptions:
    """What the study generates and builds. ``build``: options every build gets (calibration caps that
    keep a CPU build to minutes: the packaged sets hold 150 reasoning samples of ~1k tokens and 365
    instruction samples)."""

    variants: tuple[Variant, ...] = VARIANTS
    #: λ ≤ 2 moved no method's compliance past 0.19 on this world (task arithmetic) and RAIN's not at all,
    #: so the grid goes on to 4 (bench/RESULTS.md)
    lambdas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
    max_new_tokens: int = 128
    #: λ* on the dev split by rain tune's rule (most compliant λ keeping accuracy ≥ 90 % and format ≥ 98 % of the LRM's)
    tune_grid: str = "0.5,1,1.5,2,3,4"
    refine_rounds: int = 0
    build: dict[str, Any] = field(default_factory=lambda: {"max_samples": 64, "stage2_max_samples": 96,
                                                           "max_seq_len": 1024})

    def tune_options(self) -> TuneOptions:
        return TuneOptions(grid=self.tune_grid, refine_rounds=self.refine_rounds, max_new_tokens=self.max_new_tokens,
                           batch_size=64)


def ci_study() -> StudyOptions:
    """The CI scale: RAIN, task arithmetic and RAIN r16 on a handful of calibration samples, one λ, short answers."""
    return StudyOptions(variants=(VARIANTS[0], VARIANTS[2], VARIANTS[6]), lambdas=(1.0,), max_new_tokens=24,
                        tune_grid="0:1:1", refine_rounds=0,
                        build={"max_samples": 4, "stage2_max_samples": 4, "max_seq_len": 1024})


class RealWorldNotSound(RuntimeError):
    """The SmolLM2 world failed :data:`GATE`; the message names every failed property with its number."""


# ----------------------------------------------------------------------------- caching

def _sha(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def adapter_sha(adapter: Path) -> str:
    """SHA-256 of an adapter directory's config and weights."""
    return _sha(_file_sha(adapter / "adapter_config.json"), weights_sha256(adapter))


def cached_generate(cache: Path, key: str, make) -> list[str]:
    """``make()`` (a list of responses), stored at ``cache`` with ``key``; reused only when the key matches."""
    if cache.is_file():
        try:
            d = json.loads(cache.read_text())
            if d.get("key") == key:
                return d["responses"]
        except ValueError:
            pass
    resp = make()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")  # two studies may share a world
    tmp.write_text(json.dumps({"key": key, "responses": resp}))
    tmp.replace(cache)
    return resp


# ----------------------------------------------------------------------------- soundness

def soundness(p: RealWorldPaths, cache: Path, *, max_new_tokens: int, progress: bool,
              only: Sequence[str] | None = None) -> dict[str, Any]:
    """``{lrm, base, itm_direct, itm_test}``: metrics (with per-row scores under ``rows``) of the LRM and
    B on the test split (each with its own template), the ITM on its held-out direct prompts and on the test split."""
    test, direct = load_prompts(p.test), load_prompts(p.direct)
    out = {}
    for name, model_dir, rows in (("lrm", p.lrm, test), ("base", p.base, test), ("itm_direct", p.itm, direct),
                                  ("itm_test", p.itm, test)):
        if only is not None and name not in only:
            continue
        model, tok = load_model(model_dir)
        key = _sha(recorded_sha256(model_dir), [r["prompt"] for r in rows], max_new_tokens, tok.chat_template)
        resp = cached_generate(cache / f"{name}.json", key, lambda: generate_responses(
            model, tok, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens, progress=progress,
            desc=f"soundness {name}"))
        scores = [score_response(r, x) for r, x in zip(rows, resp)]
        out[name] = {**aggregate(scores), "rows": _compact(scores), "example": resp[0]}
    return out


def _compact(scores: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"c": s["follow_all"], "a": s["correct"], "f": s["think_ok"]} for s in scores]


def _scored(rows: Sequence[dict[str, Any]], responses: Sequence[str]) -> list[dict[str, Any]]:
    """Per-row compliance / correctness / format of ``responses`` to ``rows``, compacted."""
    return _compact([score_response(r, x) for r, x in zip(rows, responses)])


def gate_problems(s: dict[str, Any]) -> list[str]:
    """The failed :data:`GATE` properties, each with its numbers (``not (x >= floor)``: NaN fails)."""
    lrm, base, itm = s["lrm"], s["base"], s["itm_direct"]
    bad = []
    if not lrm["format_validity"] >= GATE["min_format"]:
        bad.append(f"LRM format validity {lrm['format_validity']:.2f} < {GATE['min_format']}")
    if not (lrm["accuracy"] >= GATE["min_acc_ratio"] * base["accuracy"] and lrm["accuracy"] > 0):
        bad.append(f"LRM accuracy {lrm['accuracy']:.2f} is not ≥ {GATE['min_acc_ratio']}× B's {base['accuracy']:.2f}")
    if not itm["compliance"] >= GATE["min_itm"]:
        bad.append(f"ITM compliance on held-out phrasings {itm['compliance']:.2f} < {GATE['min_itm']}")
    if not lrm["compliance"] <= GATE["max_lrm_compliance"]:
        bad.append(f"LRM compliance {lrm['compliance']:.2f} > {GATE['max_lrm_compliance']} (it already follows)")
    return bad


# ----------------------------------------------------------------------------- adapters

def build_variants(p: RealWorldPaths, variants: Sequence[Variant], *, build: dict[str, Any] | None = None,
                   rebuild: bool = False, say=print) -> tuple[dict[str, Path], dict[str, float]]:
    """Build (or reuse, when the options' hash matches) one adapter per variant under ``<world>/adapters``."""
    out, times = {}, {}
    for v in variants:
        world = v.calib == "world"
        icalib = p.instruction_calib if world else calibration_dir() / "instruction_calibration_set.jsonl"
        kw = dict(method=v.method, reasoning_calib=str(p.reasoning_calib) if world else None,
                  instruction_calib=str(icalib) if get_method(v.method).stage2 else None,
                  **{**(build or {}), **v.options})
        target = p.root / "adapters" / f"{v.name.replace(' ', '-').replace('@', '-')}-{_sha(kw)[:8]}"
        t0 = time.time()
        if rebuild or not (target / "adapter_config.json").exists():
            say(f"  building {v.name} …")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build_adapter(p.lrm, p.itm, p.base, target, overwrite=True, progress=False, verbose=False,
                              feature_cache=str(p.root / "feature-cache"), **kw)
        times[v.name] = time.time() - t0
        out[v.name] = target
    return out, times


# ----------------------------------------------------------------------------- generation on an adapter

class MergedCopy:
    """A plain copy of the LRM whose targeted weights are set to ``W + λ·D`` of one adapter at a time.

    The study generates one λ per batch, so it runs the merged weights (what ``rain export merged``
    writes) instead of the per-row λ path: a dense RainLinear costs ~1.7× a plain linear on this CPU
    (bench/RESULTS.md), the merged copy 1×; both compute the same function up to float rounding."""

    def __init__(self, path: Path) -> None:
        self.model, _ = load_model(path)
        self._orig: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def at(self, rain_model, lam: float):
        merged = rain_model.merge(float(lam))
        sd = self.model.state_dict()
        for k in merged:
            self._orig.setdefault(k, sd[k].clone())
        restore = {k: v for k, v in self._orig.items() if k not in merged}
        self.model.load_state_dict({**restore, **merged}, strict=False)
        return self.model


def _responses(model, merged: MergedCopy, tok, a_sha: str, rows: list[dict[str, Any]], lam: float, cache: Path,
               *, max_new_tokens: int, progress: bool, desc: str) -> list[str]:
    key = _sha(a_sha, [r["prompt"] for r in rows], float(lam), max_new_tokens, "merged")

    def make() -> list[str]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=LambdaRangeWarning)
            return generate_responses(merged.at(model, lam), tok, [r["prompt"] for r in rows],
                                      max_new_tokens=max_new_tokens, progress=progress, desc=desc)
    return cached_generate(cache, key, make)


def sweep_variant(lrm_model, merged: MergedCopy, tok, name: str, adapter: Path, test: list[dict[str, Any]],
                  dev: list[dict[str, Any]], opts: StudyOptions, cache: Path, *, tune: bool, lam_star: float | None,
                  lrm_test: list[dict[str, Any]], lrm_dev: list[dict[str, Any]] | None,
                  progress: bool) -> dict[str, Any]:
    """Test-split scores at every λ (λ 0 = the LRM's, shared), λ* from dev (or ``lam_star``), test at λ*."""
    a_sha, mnt = adapter_sha(adapter), opts.max_new_tokens
    model = RainAdapter.attach(lrm_model, adapter)
    slug = cache / name.replace(" ", "_").replace("@", "_")
    try:
        curve = {0.0: lrm_test}
        for lam in (opts.lambdas if tune else ()):
            resp = _responses(model, merged, tok, a_sha, test, lam, slug / f"test_{lam:g}.json", max_new_tokens=mnt, progress=progress,
                              desc=f"{name} λ {lam:g}")
            curve[float(lam)] = _scored(test, resp)
        tune_out = None
        if tune:
            def evaluate(lams: list[float]) -> list[LambdaPoint]:
                pts = []
                for lam in lams:
                    if lam == 0.0 and lrm_dev is not None:
                        sc = lrm_dev
                    else:
                        resp = _responses(model, merged, tok, a_sha, dev, lam, slug / f"dev_{lam:g}.json",
                                          max_new_tokens=mnt, progress=progress, desc=f"tune {name} λ {lam:g}")
                        sc = _scored(dev, resp)
                    pts.append(point_from_scores(lam, [{"follow_all": s["c"], "correct": s["a"], "think_ok": s["f"]}
                                                       for s in sc]))
                return pts
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = search(evaluate, opts.tune_options())
            lam_star = res.recommended_lambda
            tune_out = {"lambda": lam_star, "points": [asdict(pt) for pt in res.points]}
        # λ* on test; a variant that is not tuned (low rank) also at the grid's largest λ, so a fidelity
        # comparison exists even where RAIN's λ* is 0
        extra = [lam_star] if tune else [lam_star, max(opts.lambdas, default=None)]
        for lam in dict.fromkeys(x for x in extra if x is not None and float(x) not in curve):
            resp = _responses(model, merged, tok, a_sha, test, lam, slug / f"test_{lam:g}.json",
                              max_new_tokens=mnt, progress=progress, desc=f"{name} λ {lam:g}")
            curve[float(lam)] = _scored(test, resp)
    finally:
        model.detach()
    return {"curve": dict(sorted(curve.items())), "lambda_star": lam_star, "tune": tune_out}


# ----------------------------------------------------------------------------- statistics

def rates(rows: Sequence[dict[str, Any]], idx: Sequence[int] | None = None) -> dict[str, Any]:
    """Compliance / accuracy / format over ``rows`` (or the resample ``idx``) with k and n."""
    sel = [rows[i] for i in idx] if idx is not None else rows
    out = {}
    for key, name in (("c", "compliance"), ("a", "accuracy"), ("f", "format_validity")):
        xs = [bool(r[key]) for r in sel if r[key] is not None]
        out[name] = sum(xs) / len(xs) if xs else float("nan")
        out[f"{name}_k"], out[f"{name}_n"] = sum(xs), len(xs)
    return out


def at_compliance(curve: dict[float, dict[str, Any]], target: float, key: str = "accuracy") -> float | None:
    """``key`` at compliance ``target`` along λ (:func:`rain_adapter.demo.run.value_at_compliance`)."""
    return value_at_compliance([{"lambda": lam, **r} for lam, r in curve.items()], target, key)


def paired_bootstrap(a: dict[float, list], b: dict[float, list], target: float, *, n: int = BOOTSTRAP,
                     seed: int = 0) -> dict[str, Any]:
    """Accuracy(a) − accuracy(b) at equal compliance ``target``, with a paired bootstrap over prompts
    (the same resampled prompts for both methods at every λ); resamples where a curve misses ``target`` are dropped."""
    rows = len(next(iter(a.values())))
    point_a = at_compliance({k: rates(v) for k, v in a.items()}, target)
    point_b = at_compliance({k: rates(v) for k, v in b.items()}, target)
    rng = random.Random(seed)
    diffs = []
    for _ in range(n):
        idx = [rng.randrange(rows) for _ in range(rows)]
        xa = at_compliance({k: rates(v, idx) for k, v in a.items()}, target)
        xb = at_compliance({k: rates(v, idx) for k, v in b.items()}, target)
        if xa is not None and xb is not None:
            diffs.append(xa - xb)
    diffs.sort()
    lo = diffs[int(0.025 * len(diffs))] if diffs else float("nan")
    hi = diffs[min(len(diffs) - 1, int(0.975 * len(diffs)))] if diffs else float("nan")
    est = point_a - point_b if point_a is not None and point_b is not None else float("nan")
    return {"target_compliance": target, "diff": est, "ci95": [lo, hi], "resamples_used": len(diffs), "resamples": n}


def summarize(results: dict[str, dict[str, Any]], sound: dict[str, Any]) -> dict[str, Any]:
    """Per variant: λ*, rates at λ* with Wilson intervals, gap closed, keep ratios, accuracy at equal
    compliance; RAIN − task arithmetic at equal compliance (paired bootstrap); the moonshot verdict."""
    lrm, c_itm = rates(sound["lrm"]["rows"]), sound["itm_test"]["compliance"]
    c_lrm = lrm["compliance"]
    out: dict[str, Any] = {"lrm": lrm, "c_itm": c_itm, "methods": {}}
    curves = {m: {lam: rates(rs) for lam, rs in r["curve"].items()} for m, r in results.items()}
    targets = [c for c in (0.25, 0.5) if c > c_lrm]
    for m, r in results.items():
        lam = r["lambda_star"]
        at = curves[m].get(float(lam)) if lam is not None else None
        s: dict[str, Any] = {"lambda_star": lam, "max_compliance": max(v["compliance"] for v in curves[m].values())}
        if at is not None:
            s.update({k: at[k] for k in ("compliance", "accuracy", "format_validity")})
            s["n"] = at["compliance_n"]
            for k in ("compliance", "accuracy", "format_validity"):
                s[f"{k}_ci"] = list(wilson(at[f"{k}_k"], at[f"{k}_n"])) if at[f"{k}_n"] else [float("nan")] * 2
            s["gap_closed"] = (at["compliance"] - c_lrm) / (c_itm - c_lrm) if c_itm > c_lrm else float("nan")
            s["acc_keep"] = at["accuracy"] / lrm["accuracy"] if lrm["accuracy"] else float("nan")
            s["format_keep"] = at["format_validity"] / lrm["format_validity"] if lrm["format_validity"] else float("nan")
            s["moonshot"] = bool(s["gap_closed"] >= 0.5 and s["acc_keep"] >= 0.9 and s["format_keep"] >= 0.98)
        s["acc_at"] = {str(c): at_compliance(curves[m], c) for c in targets}
        out["methods"][m] = s
    if "rain" in results and "task-arithmetic" in results:
        reach = min(out["methods"]["rain"]["max_compliance"], out["methods"]["task-arithmetic"]["max_compliance"])
        if reach > c_lrm:
            target = c_lrm + (reach - c_lrm) / 2
            out["rain_vs_ta"] = paired_bootstrap(results["rain"]["curve"], results["task-arithmetic"]["curve"], target)
    return out


def format_summary(summary: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "  n/a" if v is None or v != v else f"{v:.2f}"

    def ci(s: dict[str, Any], k: str) -> str:
        lo, hi = s.get(f"{k}_ci", [None, None])
        return f"{f(s.get(k))} [{f(lo)}, {f(hi)}]"
    targets = sorted({c for s in summary["methods"].values() for c in s["acc_at"]})
    head = (f"{'method':<24}{'λ*':>5}  {'compliance [95% CI]':<20}{'accuracy [95% CI]':<20}{'format [95% CI]':<20}"
            f"{'gap':>6}{'acc kept':>9}" + "".join(f"{'acc@c=' + c:>11}" for c in targets))
    lines = [head, "-" * len(head)]
    for m, s in summary["methods"].items():
        lam = s["lambda_star"]
        lines.append(f"{m:<24}{(f'{lam:g}' if lam is not None else 'n/a'):>5}  {ci(s, 'compliance'):<20}"
                     f"{ci(s, 'accuracy'):<20}{ci(s, 'format_validity'):<20}{f(s.get('gap_closed')):>6}"
                     f"{f(s.get('acc_keep')):>9}" + "".join(f"{f(s['acc_at'].get(c)):>11}" for c in targets))
    return "\n".join(lines)


def storage_record(adapter: Path) -> dict[str, Any]:
    """Size on disk and, for a low-rank adapter, its fidelity: the energy of Δ its factors keep
    (Σ kept·‖Δ‖² / Σ ‖Δ‖² over modules) and the median relative error ‖Δ − BA‖ / ‖Δ‖."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    out: dict[str, Any] = {"storage": cfg.get("storage"), "rank": cfg.get("rank"),
                           "mib": sum(f.stat().st_size for f in adapter.glob("*.safetensors")) / 2**20}
    mods = ((cfg.get("fidelity") or {}).get("modules") or {}).values()
    if mods:
        w = [m["norm"] ** 2 for m in mods]
        out["energy_kept"] = sum(m["energy_kept"] * x for m, x in zip(mods, w)) / sum(w)
        errs = sorted(m["rel_error"] for m in mods)
        out["median_rel_error"] = errs[len(errs) // 2]
    return out


def records_for_plot(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"method": m, "lambda": lam, **{k: v for k, v in rates(rs).items() if not k.endswith(("_k", "_n"))}}
            for m, r in results.items() for lam, rs in r["curve"].items()]


# ----------------------------------------------------------------------------- the study

def run_real_study(cfg: RealWorldConfig | None = None, *, root: Path | None = None, out: Path | None = None,
                   study: StudyOptions | None = None,
                   rebuild: bool = False, retrain: bool = False, progress: bool = True, verbose: bool = True,
                   allow_unsound: bool = False, threads: int | None = None) -> dict[str, Any]:
    """The whole study; returns ``{world, soundness, gate, adapters, summary, timings, out}``."""
    say = print if verbose else (lambda *a, **k: None)
    cfg = cfg or RealWorldConfig()
    study = study or (ci_study() if cfg == ci_config() else StudyOptions())
    mnt = study.max_new_tokens
    t0 = time.time()
    p = ensure_real_world(cfg, root, progress=progress, force=retrain, say=say)
    torch.set_num_threads(threads or cfg.threads)
    info = json.loads(p.info.read_text())
    say(f"world {p.root} (LRM {info['lrm']['examples']} examples / {info['lrm']['seconds']:.0f}s, "
        f"ITM {info['itm']['examples']} / {info['itm']['seconds']:.0f}s; ready in {time.time() - t0:.1f}s)")
    cache = p.root / "study"
    t1 = time.time()
    sound = soundness(p, cache / "soundness", max_new_tokens=mnt, progress=progress)
    say("\nsoundness (held-out prompts; n per row):")
    for k in ("lrm", "base", "itm_direct", "itm_test"):
        v = sound[k]
        say(f"  {k:<11} compliance {v['compliance']:.2f}  format {v['format_validity']:.2f}  thinking "
            f"{v['thinking_rate']:.2f}  accuracy {v['accuracy']:.2f}  (n={int(v['n'])})")
    problems = gate_problems(sound)
    if problems:
        msg = "the SmolLM2 world is NOT sound: " + "; ".join(problems)
        if not allow_unsound:
            raise RealWorldNotSound(msg + " (pass --allow-unsound to look at its table anyway)")
        say(f"  WARNING: {msg} (continuing: --allow-unsound)")
    else:
        say("  sound: yes (" + ", ".join(f"{k} {v}" for k, v in GATE.items()) + ")")
    t_sound = time.time() - t1

    t2 = time.time()
    adapters, build_times = build_variants(p, study.variants, build=study.build, rebuild=rebuild, say=say)
    t_build = time.time() - t2
    say(f"\nadapters ({t_build:.1f}s): " + ", ".join(f"{m} {s:.0f}s" for m, s in build_times.items()))

    t3 = time.time()
    test, dev = load_prompts(p.test), load_prompts(p.dev)
    model, tok = load_model(p.lrm)
    lrm_dev_resp = cached_generate(cache / "soundness" / "lrm_dev.json",
                                   _sha(recorded_sha256(p.lrm), [r["prompt"] for r in dev], mnt),
                                   lambda: generate_responses(model, tok, [r["prompt"] for r in dev],
                                                              max_new_tokens=mnt, progress=progress,
                                                              desc="LRM on dev"))
    lrm_dev = _scored(dev, lrm_dev_resp)
    merged = MergedCopy(p.lrm)
    results: dict[str, dict[str, Any]] = {}
    for v in study.variants:
        star = None if v.tune else results.get("rain", {}).get("lambda_star", 1.0)
        results[v.name] = sweep_variant(model, merged, tok, v.name, adapters[v.name], test, dev, study, cache / "sweep",
                                        tune=v.tune, lam_star=star, lrm_test=sound["lrm"]["rows"], lrm_dev=lrm_dev,
                                        progress=progress)
    t_sweep = time.time() - t3

    summary = summarize(results, sound)
    for name, adapter in adapters.items():
        summary["methods"][name]["adapter"] = storage_record(adapter)
    out = Path(out) if out is not None else p.root / "demo"
    out.mkdir(parents=True, exist_ok=True)
    records = records_for_plot(results)
    png = plot_sweep_if_available(records, out / "sweep.png", title="rain demo --world smollm2 (test split)")
    timings = {"world_s": t1 - t0, "soundness_s": t_sound, "build_s": t_build, "sweep_tune_s": t_sweep,
               "total_s": time.time() - t0}
    result = {"world": str(p.root), "config": asdict(cfg), "study": asdict(study), "soundness": {k: {kk: vv for kk, vv in v.items() if kk != "rows"}
                                                                          for k, v in sound.items()},
              "gate_problems": problems, "adapters": {k: str(v) for k, v in adapters.items()},
              "build_seconds": build_times, "records": records, "summary": summary,
              "results": {m: {"lambda_star": r["lambda_star"], "tune": r["tune"]} for m, r in results.items()},
              "timings": timings, "out": str(out)}
    (out / "summary.json").write_text(json.dumps(result, indent=1, default=str))
    lrm = summary["lrm"]
    say(f"\ntest split: {len(test)} prompts (problem + one constraint in a held-out phrasing; "
        f"{sum(r['held_out_type'] for r in test)} of never-trained types); λ grid {', '.join(f'{x:g}' for x in study.lambdas)}; "
        f"λ* by rain tune's rule on the dev split ({len(dev)} prompts) ({t_sweep:.0f}s)")
    say(f"LRM: compliance {lrm['compliance']:.2f}, accuracy {lrm['accuracy']:.2f}, format {lrm['format_validity']:.2f}; "
        f"ITM compliance on the same prompts {summary['c_itm']:.2f} (gap = ITM − LRM); acc@c = accuracy at equal "
        f"compliance c along λ")
    say(format_summary(summary))
    if "rain_vs_ta" in summary:
        b = summary["rain_vs_ta"]
        say(f"\nRAIN − task arithmetic, accuracy at equal compliance {b['target_compliance']:.2f}: {b['diff']:+.3f} "
            f"(paired bootstrap 95% CI [{b['ci95'][0]:+.3f}, {b['ci95'][1]:+.3f}], {b['resamples_used']}/{b['resamples']} resamples)")
    top = max(study.lambdas, default=None)
    for m, s in summary["methods"].items():
        a = s["adapter"]
        if a.get("energy_kept") is not None:
            say(f"{m}: rank {a['rank']}, {a['mib']:.0f} MiB, keeps {a['energy_kept']:.1%} of Δ's energy "
                f"(median relative error {a['median_rel_error']:.2f}); dense rain is "
                f"{summary['methods'].get('rain', {}).get('adapter', {}).get('mib', float('nan')):.0f} MiB")
            for name in (m, "rain"):
                rs = results.get(name, {}).get("curve", {}).get(float(top)) if top is not None else None
                if rs is not None:
                    r = rates(rs)
                    say(f"  {name} at λ {top:g}: compliance {r['compliance']:.2f}, accuracy {r['accuracy']:.2f}, "
                        f"format {r['format_validity']:.2f}")
    if png is None:
        say(NO_PLOT_HINT)
    say(f"\nwrote {out / 'summary.json'}" + (f", {png}" if png else "") + f"; total {timings['total_s']:.1f}s")
    return result
