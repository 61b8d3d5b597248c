"""``rain info PATH``: what an adapter holds (config, modules, storage, size, α and fidelity)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from ..build.coefficients import format_alpha_table
from ..build.lowrank import format_fidelity
from ..build.methods import REGISTRY
from ..format.arch import module_layer, module_role
from ..format.store import load_adapter, resolve_adapter


def _human(n: float) -> str:
    """A byte count in B / KiB / MiB / GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


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
        f"format       {config.format} v{config.format_version}   method: {config.method}"
        + (f" ({REGISTRY[config.method].description})" if config.method in REGISTRY else ""),
        f"LRM          {config.base_model_name_or_path or '-'}",
        f"ITM / base   {config.itm_name_or_path or '-'}  /  {config.itm_base_name_or_path or '-'}",
        f"storage      {config.storage}" + (f" (rank {config.rank})" if config.rank is not None else ""),
        f"modules      {len(deltas)}: " + ", ".join(f"{r}×{n}" for r, n in roles.items()),
        f"layers       {layers[0]}..{layers[-1]} ({len(layers)})" if layers else "layers       -",
        f"parameters   {n_params:,}   on disk {_human(disk)} in {len(files)} file(s)",
        f"λ            default {config.default_lambda}, range {config.lambda_range}",
        f"bias deltas  {sum(d.bias is not None for d in deltas.values())}",
    ]
    if config.stage1:
        s1 = {k: v for k, v in config.stage1.items() if k not in ("modules", "per_module", "calib_path")}
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
    if config.stage2:
        lines.append("stage 2\n" + format_alpha_table(config.stage2))
    if config.fidelity:
        lines.append("fidelity\n" + format_fidelity(config.fidelity))
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if args.json:
        config, deltas = load_adapter(args.path)
        print(json.dumps({"config": config.to_dict(), "modules": {k: list(d.shape) for k, d in deltas.items()}}, indent=2))
    else:
        print(describe(args.path))
    return 0


def add_parser(sub) -> None:
    """Register ``rain info``."""
    p = sub.add_parser("info", help="describe an adapter (config, modules, storage, size, α, fidelity)")
    p.add_argument("path", help="adapter directory, name in $RAIN_ADAPTER_HOME, or Hub repo id")
    p.add_argument("--json", action="store_true", help="print the config and module shapes as JSON")
    p.set_defaults(func=_run)
