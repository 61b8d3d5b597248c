"""``rain info PATH``: what an adapter holds (config, modules, storage, size, α and fidelity).

Besides the config it shows each stage's delta norm relative to plain task arithmetic (λ · Δ),
so that adapters of different methods can be compared at equal λ (Frobenius norms over all
modules, weights only; Δ = W_ITM − W_base, ``task_norm`` = ‖Δ‖_F per module in
``config.stage1["modules"]``):

    stage 1:  sqrt(Σ_m (kept_norm_m · task_norm_m)²) / sqrt(Σ_m task_norm_m²)      (= ‖Δ⊥‖_F / ‖Δ‖_F)
    stored:   ‖D‖_F / sqrt(Σ_m task_norm_m²),   ‖D‖_F² = Σ_m ‖D_m‖_F²

with ‖B A‖_F² = trace((A Aᵀ)(Bᵀ B)) for low-rank modules (float64, never forming B A). Adapters
built before ``task_norm`` was recorded show the median kept norm and say the total is not recorded.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import torch

from ..merging.coefficients import format_alpha_table
from ..merging.lowrank import format_fidelity
from ..merging.methods import REGISTRY
from ..format.arch import module_layer, module_role
from ..format.delta import ModuleDelta
from ..format.store import load_adapter, resolve_adapter

#: ``rain info --help`` (plain text; the module docstring is for developers)
DESCRIPTION = """\
Describe an adapter: where it is, its method and models, storage, modules and layers, size on
disk, the λ default and range, what rain tune measured at λ*, the Stage 1 and stored delta norms
relative to task arithmetic, the Stage 2 α table and the low-rank fidelity.

PATH is an adapter directory, a name in $RAIN_ADAPTER_HOME, or a Hub repo id. With --json the
config and the module shapes are printed as JSON instead."""


def _human(n: float) -> str:
    """A byte count in B / KiB / MiB / GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _num(v: object) -> float | None:
    """``v`` as a finite float, else None (missing, null, a string, NaN)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def stored_norm(deltas: dict[str, ModuleDelta]) -> float:
    """‖D‖_F over all modules' weight deltas in float64: dense ‖D‖_F, low rank
    ‖B A‖_F = sqrt(trace((A Aᵀ)(Bᵀ B))) (r × r products only)."""
    total = 0.0
    for d in deltas.values():
        if d.is_lowrank:
            a, b = d.lora_A.double(), d.lora_B.double()
            total += float(((a @ a.T) * (b.T @ b)).sum())        # trace(XY) = Σ X ⊙ Yᵀ, Y symmetric
        else:
            total += float(torch.linalg.vector_norm(d.delta, dtype=torch.float64)) ** 2
    return math.sqrt(max(total, 0.0))


def norm_lines(config, deltas: dict[str, ModuleDelta]) -> list[str]:
    """The ``norms`` block: Stage 1 and stored delta norms relative to task arithmetic (module docstring)."""
    s1 = config.stage1 or {}
    mods = s1.get("modules") or {}
    d_norm = stored_norm(deltas)
    kind = "after Stage 2 α" if (config.stage2 or {}).get("alpha_stats") or \
        isinstance((config.stage2 or {}).get("alpha"), dict) else "as stored"
    if config.storage == "lowrank":
        kind += f", low rank {config.rank}"
    tn = {n: _num(m.get("task_norm")) for n, m in mods.items()}
    kept = {n: _num(m.get("kept_norm")) for n, m in mods.items()}
    lines = []
    if mods and all(v is not None for v in tn.values()) and all(v is not None for v in kept.values()) \
            and set(deltas) <= set(mods):
        ta = math.sqrt(sum(v * v for v in tn.values()))
        s1_rel = math.sqrt(sum((kept[n] * tn[n]) ** 2 for n in mods)) / ta if ta > 0 else float("nan")
        lines.append(f"norms        relative to task arithmetic (‖·‖_F over {len(mods)} modules, weights; "
                     f"‖Δ‖_F = {ta:.4g})")
        lines.append(f"             stage 1 ‖Δ⊥‖/‖Δ‖   {s1_rel:.4f}")
        lines.append(f"             stored  ‖D‖/‖Δ‖    {d_norm / ta if ta > 0 else float('nan'):.4f}   "
                     f"({kind}; ‖D‖_F = {d_norm:.4g})")
    else:
        ks = sorted(v for v in kept.values() if v is not None)
        lines.append("norms        relative to task arithmetic: total not recorded (the adapter has no per-module "
                     "task_norm ‖Δ‖_F; built before it was recorded)")
        if ks:
            lines.append(f"             stage 1 median kept ‖Δ⊥‖/‖Δ‖ per module {ks[len(ks) // 2]:.3f}")
        lines.append(f"             stored  ‖D‖_F = {d_norm:.4g}   ({kind})")
    total = _num(s1.get("kept_norm_total"))
    if total is not None:
        lines.append(f"             kept_norm_total (recorded by the build) {total:.4f}")
    return lines


def warning_lines(config) -> list[str]:
    """``config.stage1["warnings"]`` (a list of strings, or one string) as ``WARNING: …`` lines."""
    w = (config.stage1 or {}).get("warnings") or []
    return [f"WARNING: {x}" for x in ([w] if isinstance(w, str) else w)]


def describe(name_or_path: str) -> str:
    """A human-readable report of an adapter."""
    root = resolve_adapter(name_or_path)
    config, deltas = load_adapter(root)
    files = sorted(p for p in Path(root).iterdir() if p.suffix == ".safetensors")
    disk = sum(p.stat().st_size for p in files)
    n_params = sum(d.numel() for d in deltas.values())
    roles = Counter(module_role(m) for m in deltas)
    layers = sorted({module_layer(m) for m in deltas})
    lines = [
        f"adapter      {root}",
        *warning_lines(config),
        f"format       {config.format} v{config.format_version}   method: {config.method}"
        + (f" ({REGISTRY[config.method].description})" if config.method in REGISTRY else ""),
        f"LRM          {config.base_model_name_or_path or '-'}",
        f"ITM / base   {config.itm_name_or_path or '-'}  /  {config.itm_base_name_or_path or '-'}",
        f"storage      {config.storage}" + (f" (rank {config.rank})" if config.rank is not None else ""),
        f"modules      {len(deltas)}: " + ", ".join(f"{r}×{n}" for r, n in roles.items()),
        f"layers       {layers[0]}..{layers[-1]} ({len(layers)})" if layers else "layers       -",
        f"parameters   {n_params:,}   on disk {_human(disk)} in {len(files)} file(s)",
        f"λ            default {config.default_lambda}, range {config.lambda_range}",
        *tune_lines(config),
        f"bias deltas  {sum(d.bias is not None for d in deltas.values())}",
    ]
    if config.stage1:
        s1 = {k: v for k, v in config.stage1.items()
              if k not in ("modules", "per_module", "calib_path", "warnings", "kept_norm_total")}
        lines.append("stage 1      " + ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in s1.items()
                                                 if v is not None))
        mods = config.stage1.get("modules") or {}
        res = [m["residual"] for m in mods.values() if "residual" in m]
        plain = sum(1 for m in mods.values() if m.get("projected") is False)
        if res:
            kept = [m["kept_norm"] for m in mods.values() if "residual" in m]
            lines.append(f"             projected {len(res)} module(s): residual ‖Δ⊥X‖/‖ΔX‖ median "
                         f"{sorted(res)[len(res) // 2]:.3g} (max {max(res):.3g}), kept ‖Δ⊥‖/‖Δ‖ median "
                         f"{sorted(kept)[len(kept) // 2]:.3f}" + (f"; {plain} left unprojected" if plain else ""))
    lines += norm_lines(config, deltas)
    if config.stage2:
        lines.append("stage 2\n" + format_alpha_table(config.stage2))
    if config.fidelity:
        lines.append("fidelity\n" + format_fidelity(config.fidelity))
    return "\n".join(lines)


def tune_lines(config) -> list[str]:
    """What ``rain tune`` measured at λ*: compliance / accuracy / format with intervals, on which prompts."""
    t = config.tune
    if config.recommended_lambda is None or not t:
        return []
    star = next((p for p in t.get("points", []) if p.get("lambda") == config.recommended_lambda), None)
    src = t.get("prompts") or {}
    out = [f"tuned        λ* = {config.recommended_lambda:g} on {src.get('rows', '?')} prompts of "
           f"{src.get('path', '?')} ({t.get('date', '?')}); floors {t.get('floors')}"]
    if star:
        def rate(k: str) -> str:
            if star.get(k) is None:   # nothing scored for it (e.g. no references)
                return f"{k} -"
            lo, hi = star[k + "_ci"]
            return f"{k} {star[k]:.3f} [{lo:.2f}, {hi:.2f}]"
        out.append("             at λ*: " + ", ".join(rate(k) for k in ("compliance", "accuracy", "format_validity")))
    return out


def _run(args: argparse.Namespace) -> int:
    if args.json:
        config, deltas = load_adapter(args.path)
        print(json.dumps({"config": config.to_dict(), "modules": {k: list(d.shape) for k, d in deltas.items()}}, indent=2))
    else:
        print(describe(args.path))
    return 0


def add_parser(sub) -> None:
    """Register ``rain info``."""
    p = sub.add_parser("info", help="describe an adapter (config, modules, storage, size, α, fidelity)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="adapter directory, name in $RAIN_ADAPTER_HOME, or Hub repo id")
    p.add_argument("--json", action="store_true", help="print the config and module shapes as JSON")
    p.set_defaults(func=_run)
