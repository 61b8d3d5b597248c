"""Shared by the toy-world bench scripts: find a cached world and one of its cached adapters."""
from __future__ import annotations

import json
from pathlib import Path

from rain_adapter.demo.run import value_at_compliance
from rain_adapter.demo.train import world_home


def world_for_seed(seed: int) -> Path:
    """The cached world trained with ``seed`` (``rain demo --seed S`` makes it)."""
    for root in sorted(world_home().glob("*")):
        info = root / "world.json"
        if info.is_file() and json.loads(info.read_text())["config"]["seed"] == seed:
            return root
    raise SystemExit(f"no cached world with seed {seed} under {world_home()}: run `rain demo --seed {seed}`")


def cached_adapter(root: Path, method: str, **stage1) -> Path:
    """The one adapter in ``root/adapters`` built with ``method`` whose Stage 1 settings equal
    ``stage1`` (a setting absent from the config counts as None); exits if none or several match."""
    found = []
    for d in sorted((root / "adapters").glob(method + "-*")):
        cfg = json.loads((d / "adapter_config.json").read_text())
        st = cfg.get("stage1") or {}
        if cfg.get("method") == method and all(st.get(k) == v for k, v in stage1.items()):
            found.append(d)
    if len(found) != 1:
        raise SystemExit(f"{root}: {len(found)} cached {method} adapters with {stage1} ({[d.name for d in found]}); "
                         f"run the demo commands of bench/RESULTS.md")
    return found[0]


def curve_summary(records: list[dict]) -> dict:
    """One method's λ curve (sweep records): the most compliant point (``peak``, the smallest λ on
    ties), accuracy interpolated at compliance 0.25 / 0.5 (None if never reached) and the lowest
    format validity on the curve."""
    rs = sorted(records, key=lambda r: r["lambda"])
    return {"peak": max(rs, key=lambda r: (r["compliance"], -r["lambda"])),
            "acc25": value_at_compliance(rs, 0.25, "accuracy"), "acc50": value_at_compliance(rs, 0.5, "accuracy"),
            "min_format": min(r["format_validity"] for r in rs)}


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"
