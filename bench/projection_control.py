"""Random-projection control of Stage 1 in the toy world (DESIGN §6.2's claim).

    for s in 0 1 2; do
      rain demo --seed $s --out runs/base$s
      rain demo --seed $s --methods rain,rain-stage1 --projection random --out runs/rand$s
      rain demo --seed $s --methods rain,rain-stage1 --project-layers 0-1 --out runs/pl$s
    done
    python bench/projection_control.py runs

``--projection random`` removes as many input directions per module as the null-space projection
(same protect energy), but drawn at random. If the thinking-feature directions matter, RAIN
(hard) keeps more accuracy than the control at equal instruction compliance. Prints, per world and
method: the highest compliance on the λ grid, accuracy interpolated at compliance 0.25 / 0.5, and
the accuracy at the λ where compliance peaks.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from _worlds import curve_summary, fmt  # bench/ is the script's folder


def load(path: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            rec = {k: (float(v) if k != "method" else v) for k, v in r.items()}
            out.setdefault(rec["method"], []).append(rec)
    return out


def row(world: int, name: str, rs: list[dict]) -> str:
    c = curve_summary(rs)
    peak = c["peak"]
    return (f"| {world} | {name} | {peak['compliance']:.2f} (λ {peak['lambda']:g}) | {fmt(c['acc25'])} | "
            f"{fmt(c['acc50'])} | {peak['accuracy']:.2f} | {c['min_format']:.2f} |")


VARIANTS = (("base", "null space"), ("rand", "random control"), ("pl", "null space, first half only"))


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else "runs")
    print("| world | method | max compliance (at λ) | acc @ c=0.25 | acc @ c=0.5 | acc at max c | "
          "min format |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for base in sorted(p for p in root.glob("base*") if p.is_dir()):
        w = int(base.name[4:])
        runs = {tag: load(root / f"{tag}{w}" / "sweep.csv") for tag, _ in VARIANTS
                if (root / f"{tag}{w}" / "sweep.csv").is_file()}
        for m in ("rain", "rain-stage1"):
            for tag, label in VARIANTS:
                if tag in runs and m in runs[tag]:
                    print(row(w, f"{m} ({label})", runs[tag][m]))
        print(row(w, "task-arithmetic", runs["base"]["task-arithmetic"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
