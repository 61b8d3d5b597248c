"""``rain demo``: the toy world end to end on a CPU.

1. load the world's base / LRM / ITM from the cache, else from the world shipped with the package
   (hash-checked, :mod:`rain_adapter.demo.shipped`), else train it (:mod:`rain_adapter.demo.train`;
   ``retrain=True`` always trains);
2. check that it is sound (:mod:`rain_adapter.demo.soundness`): the gate (:func:`gate_for`) stops the
   demo with :class:`WorldNotSound` unless ``allow_unsound``;
3. build RAIN and the baselines with :func:`rain_adapter.merging.pipeline.build_adapter` from the world's own
   reasoning / instruction calibration sets (cached next to the world);
4. sweep λ on held-out reasoning prompts with format instructions (mixed-λ batches), print the
   table, write ``sweep.csv``, ``sweep.png``, ``responses.jsonl`` and ``summary.json``.

Summary per method (the issue's measure): λ* = the λ with the highest compliance among those whose
format validity is ≥ 98 % of the LRM's; gap closed = (compliance(λ*) − c_LRM) / (c_ITM − c_LRM)
with c_ITM the ITM's compliance on the same prompts (its own, direct template); and, for every
baseline, its format validity and accuracy interpolated at RAIN's compliance.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rain_adapter.merging.methods import get_method, method_names
from rain_adapter.merging.options import BuildOptions, parse_int_list
from rain_adapter.merging.pipeline import build_adapter
from rain_adapter.evaluation.plots import NO_PLOT_HINT, plot_sweep_if_available
from rain_adapter.evaluation.sweep import (
    format_table, load_model, load_prompts, sweep_adapters, write_csv,
)
from rain_adapter.format.lambdas import parse_lambdas

from . import shipped
from .soundness import evaluate_world, is_sound, max_new_tokens
from .train import WorldConfig, WorldPaths, ci_config, ensure_world, set_threads

#: every registered build method (rain_adapter.merging.methods.REGISTRY), in registry order
DEMO_METHODS = method_names()
FORMAT_KEEP = 0.98
ACC_KEEP = 0.9
MATCH_COMPLIANCE = (0.25, 0.5)
DEMO_PROTECT_ENERGY = 0.95   # measured on this world (bench/RESULTS.md); also the build default
DEMO_LAMBDAS = "0:3:0.25"
#: what a world must show before the demo builds anything on it (is_sound's thresholds): an LRM
#: that reasons well in the thinking format and ignores instructions, an ITM that follows them
DEMO_GATE = {"min_acc": 0.9, "min_format": 1.0, "min_itm": 0.9}
#: the CI world (``rain demo --ci``: 2-digit additions, 800 base steps) is smaller and less accurate
#: by design; its gate is what tests/test_world.py asserts of it
CI_GATE = {"min_acc": 0.3, "min_format": 0.95, "min_itm": 0.9}


def gate_for(cfg: WorldConfig) -> dict[str, float]:
    """The soundness thresholds a world must meet: :data:`CI_GATE` for the CI world, else :data:`DEMO_GATE`."""
    return CI_GATE if cfg == ci_config() else DEMO_GATE


class WorldNotSound(RuntimeError):
    """The world failed its gate (:func:`gate_for`): its numbers would not mean what the demo's table says."""


#: next to each demo adapter ``<world>/adapters/<m>-<key>``: ``.<m>-<key>.record.json`` (hidden, so a
#: ``<m>-*`` glob finds adapter directories only) = ``{"world_weights_sha256", "files": {name: [bytes,
#: sha256]}}``, written after the build
ADAPTER_RECORD = ".record.json"


def adapter_record_path(target: Path) -> Path:
    """Where the record of the demo adapter ``target`` is kept (:data:`ADAPTER_RECORD`)."""
    return target.with_name(f".{target.name}{ADAPTER_RECORD}")


def world_weights_id(root: Path) -> str:
    """The world's weight hash: its ``MANIFEST.json``'s (which ``ensure_world`` just checked the
    files against), else computed from the checkpoints."""
    try:
        return str(shipped.read_manifest(root)["weights_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return shipped.weights_sha256(root)


def _adapter_files(target: Path) -> dict[str, list]:
    return {p.name: [p.stat().st_size, shipped.file_sha256(p)] for p in sorted(target.iterdir()) if p.is_file()}


def adapter_problem(target: Path, world_id: str) -> str | None:
    """Why the demo adapter ``target`` may not be reused (None: its record names this world's weights
    and its files have the recorded sizes and SHA-256; no file is a symlink or was added)."""
    rec_p = adapter_record_path(target)
    if not (target / "adapter_config.json").is_file():
        return "not built yet"
    try:
        rec = json.loads(rec_p.read_text())
        files = rec["files"]
    except FileNotFoundError:
        return f"{rec_p.name} is missing (nothing records which world and files it was built from)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{rec_p.name} is unreadable ({e})"
    if rec.get("world_weights_sha256") != world_id:
        return "it was built on other world weights"
    link = next((p for p in target.iterdir() if p.is_symlink()), None)
    if link is not None:
        return f"{link.name} is a symlink"
    got = {p.name: p.stat().st_size for p in target.iterdir() if p.is_file()}
    for name, (size, sha) in files.items():
        if name not in got:
            return f"{name} is missing"
        if got[name] != size or shipped.file_sha256(target / name) != sha:
            return f"{target.name}/{name} differs from the record made when it was built"
    extra = sorted(set(got) - set(files))
    return f"{target.name}/{extra[0]} is not part of its record (a file was added)" if extra else None


def build_methods(paths: WorldPaths, methods: Sequence[str], *, rebuild: bool = False, progress: bool = False,
                  **build_kw: Any) -> tuple[dict[str, Path], dict[str, float]]:
    """Build (or reuse) one adapter per method under ``<world>/adapters/<method>-<options hash>``.

    An adapter is reused only when its record (:data:`ADAPTER_RECORD`, :func:`adapter_problem`)
    names the world's current weights and its files still match; a changed one is a
    :class:`shipped.WorldIntegrityWarning` naming the file, and is rebuilt.
    Returns ({method: adapter dir}, {method: build seconds (0 when reused)}).
    """

    out: dict[str, Path] = {}
    times: dict[str, float] = {}
    world_id = world_weights_id(paths.root)
    for m in methods:
        # the key covers every option with its current default (not only the ones passed here), so an
        # adapter built before a default changed (e.g. Stage 2's ρ) is rebuilt, never silently reused
        opts = BuildOptions(method=m, **build_kw).to_dict()
        key = hashlib.sha256(json.dumps(opts, sort_keys=True, default=str).encode()).hexdigest()[:8]
        target = paths.root / "adapters" / f"{m}-{key}"
        t0 = time.time()
        problem = None if rebuild else adapter_problem(target, world_id)
        if rebuild or problem is not None:
            if problem not in (None, "not built yet"):
                warnings.warn(f"demo adapter {target}: {problem}; it is not reused but rebuilt",
                              shipped.WorldIntegrityWarning, stacklevel=2)
            rec_p = adapter_record_path(target)
            rec_p.unlink(missing_ok=True)
            build_adapter(paths.lrm, paths.itm, paths.base, target, reasoning_calib=str(paths.reasoning_calib),
                          instruction_calib=str(paths.instruction_calib) if get_method(m).stage2 else None, method=m,
                          overwrite=True, progress=progress, verbose=False, **build_kw)
            tmp = rec_p.with_name(f".{rec_p.name}.tmp")
            tmp.write_text(json.dumps({"world_weights_sha256": world_id, "files": _adapter_files(target)}, indent=1))
            os.replace(tmp, rec_p)
        times[m] = time.time() - t0
        out[m] = target
    return out, times


def value_at_compliance(records: list[dict[str, Any]], target: float, key: str) -> float | None:
    """``key`` at compliance ``target`` along a method's λ curve (linear between λ grid points, first
    crossing); None if the curve never reaches it."""
    rs = sorted(records, key=lambda r: r["lambda"])
    for a, b in zip(rs, rs[1:]):
        ca, cb = a["compliance"], b["compliance"]
        if (ca - target) * (cb - target) <= 0 and ca != cb:
            t = (target - ca) / (cb - ca)
            return a[key] + t * (b[key] - a[key])
        if ca == target:
            return a[key]
    if rs and rs[-1]["compliance"] == target:
        return rs[-1][key]
    return None


def summarize(records: list[dict[str, Any]], c_itm: float, lrm: dict[str, float]) -> dict[str, Any]:
    """Per method (``records`` must include λ = 0, the bare LRM):

    - ``lambda`` / ``compliance`` / ``gap_closed`` / ``format_validity`` / ``accuracy``: the issue's
      point, the λ with the highest compliance whose format validity is ≥ 98 % of the LRM's;
    - ``acc_keep``: the same with "accuracy ≥ 90 % of the LRM's" as the constraint;
    - ``acc_at``: accuracy interpolated along the λ curve at compliance 0.25 and 0.5 (equal compliance);
    - ``at_rain_compliance``: format validity and accuracy at RAIN's compliance of the first point.
    """
    out: dict[str, Any] = {}
    c_lrm = lrm["compliance"]

    def best(rs: list[dict[str, Any]], key: str, floor: float) -> dict[str, Any]:
        ok = [r for r in rs if r[key] == r[key] and r[key] >= floor] or [min(rs, key=lambda r: r["lambda"])]
        b = max(ok, key=lambda r: (r["compliance"], -r["lambda"]))
        gap = (b["compliance"] - c_lrm) / (c_itm - c_lrm) if c_itm > c_lrm else float("nan")
        return {"lambda": b["lambda"], "compliance": b["compliance"], "gap_closed": gap,
                "format_validity": b["format_validity"], "accuracy": b["accuracy"]}

    for m in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == m]
        out[m] = best(rs, "format_validity", FORMAT_KEEP * lrm["format_validity"])
        out[m]["acc_keep"] = best(rs, "accuracy", ACC_KEEP * lrm["accuracy"])
        out[m]["acc_at"] = {str(c): value_at_compliance(rs, c, "accuracy") for c in MATCH_COMPLIANCE}
        out[m]["max_compliance"] = max(r["compliance"] for r in rs)
    ref = out.get("rain") or out.get("rain-stage1")
    if ref is not None:
        for m, s in out.items():
            rs = [r for r in records if r["method"] == m]
            s["at_rain_compliance"] = {k: value_at_compliance(rs, ref["compliance"], k) for k in ("format_validity", "accuracy")}
    return out


def format_summary(summary: dict[str, Any]) -> str:
    head = (f"{'method':<18}{'λ*':>6}{'comply':>8}{'gap':>7}{'format':>8}{'acc':>7}{'| acc@RAIN c':>13}"
            + "".join(f"{'acc@c=' + str(c):>11}" for c in MATCH_COMPLIANCE)
            + f"{'| acc≥90%: λ':>14}{'comply':>8}")
    lines = [head, "-" * len(head)]

    def f(v: float | None) -> str:
        return "  n/a" if v is None or v != v else f"{v:.2f}"
    for m, s in summary.items():
        at = s.get("at_rain_compliance", {})
        ak = s["acc_keep"]
        lines.append(f"{m:<18}{s['lambda']:>6.2f}{f(s['compliance']):>8}{f(s['gap_closed']):>7}"
                     f"{f(s['format_validity']):>8}{f(s['accuracy']):>7}{f(at.get('accuracy')):>13}"
                     + "".join(f"{f(s['acc_at'][str(c)]):>11}" for c in MATCH_COMPLIANCE)
                     + f"{ak['lambda']:>14.2f}{f(ak['compliance']):>8}")
    return "\n".join(lines)


def run_demo(cfg: WorldConfig | None = None, *, root: Path | None = None, out: Path | None = None,
             methods: Sequence[str] = DEMO_METHODS,
             lambdas: Sequence[float] | None = None, limit: int | None = 48,
             rebuild: bool = False, retrain: bool = False, batch_size: int = 128, progress: bool = True,
             verbose: bool = True, allow_unsound: bool = False, **build_kw: Any) -> dict[str, Any]:
    """The whole demo; returns ``{world, soundness, records, summary, timings, out}``.

    ``root``: the world's directory (default: the cache dir named by ``cfg``'s hash);
    ``build_kw``: extra options for :func:`rain_adapter.merging.pipeline.build_adapter` (e.g. ``protect_energy``).
    """
    say = print if verbose else (lambda *a, **k: None)
    lambdas = parse_lambdas(DEMO_LAMBDAS) if lambdas is None else list(lambdas)
    build_kw.setdefault("protect_energy", DEMO_PROTECT_ENERGY)
    set_threads()
    cfg = cfg or WorldConfig()
    t0 = time.time()
    paths = ensure_world(cfg, root, progress=progress, force=retrain)
    info = json.loads(paths.info.read_text())
    t_world = time.time() - t0
    say(f"world {paths.root} ({info['n_params']:,} params, vocab {info['vocab_size']}; trained in "
        f"{info['t_total_s']:.0f}s; ready in {t_world:.1f}s)")
    if retrain:
        say("  source: trained from scratch (--retrain); "
            + (shipped.compare_to_shipped(paths.root, cfg.key()) or "no world ships for this config"))
    else:
        say(f"  source: {shipped.provenance(paths.root, cfg.key())}")
    for name in ("lrm", "itm"):
        r = info[name]["delta_ratio"]
        say(f"  {name.upper()}: ‖Δ‖/‖W‖ per module median {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f})")

    t1 = time.time()
    sound = evaluate_world(paths, limit=limit)
    rows = load_prompts(paths.eval_reasoning, limit)
    rt = max_new_tokens(info["config"]["n_digits"], True)
    t_sound = time.time() - t1
    say("\nsoundness (held-out prompts):")
    for k, v in sound.items():
        say(f"  {k:<26} compliance {v['compliance']:.2f}  format {v['format_validity']:.2f}  "
            f"thinking {v['thinking_rate']:.2f}  accuracy {v['accuracy']:.2f}  (n={int(v['n'])})")
    problems = check_gate(sound, cfg, limit, allow_unsound=allow_unsound, say=say)

    t2 = time.time()
    adapters, build_times = build_methods(paths, methods, rebuild=rebuild, progress=False, **build_kw)
    t_build = time.time() - t2
    say(f"\nadapters ({t_build:.1f}s): " + ", ".join(f"{m} {build_times[m]:.1f}s" for m in methods))

    t3 = time.time()
    model, tok = load_model(paths.lrm)
    lrm = sound["lrm"]  # the bare LRM on the same rows = λ 0 of every adapter
    nz = [float(x) for x in lambdas if float(x) != 0.0]
    responses: list[dict[str, Any]] = []
    records = sweep_adapters(model, tok, [adapters[m] for m in methods], rows, nz, names=list(methods),
                             max_new_tokens=rt, batch_size=batch_size, progress=progress,
                             responses_out=responses)
    if any(float(x) == 0.0 for x in lambdas):
        records = [{"method": m, "lambda": 0.0, **lrm} for m in methods] + records
    records.sort(key=lambda r: (list(methods).index(r["method"]), r["lambda"]))
    t_sweep = time.time() - t3

    summary = summarize(records, sound["itm_on_reasoning_prompts"]["compliance"], lrm)
    out = Path(out) if out is not None else paths.root / "demo"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(records, out / "sweep.csv")
    (out / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in responses))
    png = plot_sweep_if_available(records, out / "sweep.png", title=f"rain demo: toy world {paths.root.name}")
    if png is None:
        say(NO_PLOT_HINT)
    timings = {"world_s": t_world, "soundness_s": t_sound, "build_s": t_build, "sweep_s": t_sweep,
               "total_s": time.time() - t0}
    result = {"world": str(paths.root), "world_info": {k: v for k, v in info.items() if k not in ("lrm", "itm")},
              "delta_ratio": {n: info[n]["delta_ratio"] for n in ("lrm", "itm")}, "soundness": sound,
              "sound_problems": problems, "records": records, "summary": summary, "timings": timings,
              "build_options": build_kw, "out": str(out)}
    (out / "summary.json").write_text(json.dumps(result, indent=1, default=str))
    say(f"\nλ sweep on {len(rows)} held-out reasoning prompts with one format instruction each "
        f"({t_sweep:.1f}s):")
    say(format_table(records))
    say(f"\nc_LRM {lrm['compliance']:.2f}, c_ITM {sound['itm_on_reasoning_prompts']['compliance']:.2f} "
        f"(gap = their difference); λ* = most compliant λ keeping format validity ≥ {FORMAT_KEEP:.0%} of the "
        f"LRM's ({lrm['format_validity']:.2f}); acc@c = accuracy at equal compliance c (interpolated along λ); "
        f"last: most compliant λ keeping accuracy ≥ {ACC_KEEP:.0%} of the LRM's ({lrm['accuracy']:.2f}):")
    say(format_summary(summary))
    say(f"\nwrote {out / 'sweep.csv'}" + (f", {png}" if png else "") + f", {out / 'summary.json'}; "
        f"total {timings['total_s']:.1f}s")
    return result


def check_gate(sound: dict[str, Any], cfg: WorldConfig, limit: int | None, *, allow_unsound: bool = False,
               say=print) -> list[str]:
    """Apply :func:`gate_for` ``cfg``; compare with the evaluation recorded when the world shipped.

    Raises :class:`WorldNotSound` listing what failed unless ``allow_unsound`` (then it only says so).
    """
    same = shipped.compare_soundness(sound, cfg.key(), limit)
    if same:
        say(f"  {same}")
    gate = gate_for(cfg)
    problems = is_sound(sound, **gate)
    if not problems:
        say("  sound: yes (" + ", ".join(f"{k} {v}" for k, v in gate.items()) + ")")
        return problems
    msg = "the world is NOT sound: " + "; ".join(problems)
    if not allow_unsound:
        raise WorldNotSound(msg + " — its table would mislead. Delete the world's cache directory to use the "
                            "shipped world, or pass --allow-unsound to look at it anyway")
    say(f"  WARNING: {msg} (continuing: --allow-unsound)")
    return problems


def demo_build_options(*, protect_energy: float | None = None, projection: str | None = None,
                       seed: int | None = None, project_layers: str | None = None) -> dict[str, Any]:
    """The options ``rain demo`` passes on to :func:`rain_adapter.merging.pipeline.build_adapter`:
    the given ones only; ``project_layers`` is a layer list as ``rain build`` takes it (``"0-1"``)."""
    build_kw: dict[str, Any] = {}
    if protect_energy is not None:
        build_kw["protect_energy"] = protect_energy
    if projection is not None:
        build_kw["projection"] = projection
    if seed is not None:
        build_kw["seed"] = seed
    if project_layers is not None:
        build_kw["project_layers"] = parse_int_list(project_layers)
    return build_kw
