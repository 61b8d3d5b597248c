"""``rain demo``: the CLI of :mod:`rain_adapter.demo.run` (the toy world end to end on a CPU)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..merging.nullspace import PROJECTIONS
from ..demo import run as demo
from ..demo.shipped import WorldIntegrityError
from ..demo.train import WorldConfig, ci_config, format_world_config
from .args import add_lambdas, lambdas_arg

#: ``rain demo --help`` (plain text; rain_adapter.demo.run's docstring is for developers)
DESCRIPTION = """\
Run the toy world end to end on a CPU:

1. load the world's tiny base, LRM and ITM from the cache, else from the world shipped with the
   package (hash-checked), else train them (--retrain always trains);
2. check that the world is sound: one that fails the gate stops the demo, unless
   --allow-unsound is given (the exit status is then 1);
3. build RAIN and the baselines from the world's own reasoning and instruction calibration sets;
4. sweep λ on held-out reasoning prompts that carry format instructions (several λ in one
   batch), print the table and write sweep.csv, sweep.png, responses.jsonl and summary.json.

The summary per method: λ*, the λ with the highest compliance among those whose format validity
is at least 98 % of the LRM's; the gap closed, (compliance at λ* − the LRM's compliance) /
(the ITM's compliance − the LRM's), on the same prompts; and for every baseline its format
validity and accuracy where it reaches RAIN's compliance."""


def _run(args: argparse.Namespace) -> int:
    cfg = ci_config() if args.ci else format_world_config() if args.world == "format" else WorldConfig()
    if args.seed is not None:
        cfg = WorldConfig(**{**cfg.__dict__, "seed": args.seed})
    build_kw = demo.demo_build_options(protect_energy=args.protect_energy, projection=args.projection,
                                       seed=args.build_seed, project_layers=args.project_layers)
    try:
        res = demo.run_demo(cfg, out=Path(args.out) if args.out else None, methods=args.methods.split(","),
                            lambdas=lambdas_arg(args.lambdas), limit=args.limit or None, rebuild=args.rebuild,
                            retrain=args.retrain, progress=not args.quiet, allow_unsound=args.allow_unsound,
                            **build_kw)
    except (demo.WorldNotSound, WorldIntegrityError) as e:
        print(f"rain demo: error: {e}", file=sys.stderr)
        return 1
    return 0 if not res["sound_problems"] else 1


def add_parser(subparsers) -> None:
    """Register ``rain demo``."""
    p = subparsers.add_parser("demo", help="train a toy LRM/ITM world on the CPU, build RAIN and baselines, "
                              "sweep λ", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ci", action="store_true", help="the small CI world (2-digit additions, fewer steps)")
    p.add_argument("--out", default=None, help="output dir (default <world cache>/demo)")
    p.add_argument("--methods", default=",".join(demo.DEMO_METHODS), help="comma list (default: all)")
    add_lambdas(p, default=demo.DEMO_LAMBDAS, help=f"λ grid (default {demo.DEMO_LAMBDAS})")
    p.add_argument("--limit", type=int, default=48, help="evaluation prompts (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="world seed (a different world)")
    p.add_argument("--world", default="default", choices=["default", "format"],
                   help="format: the ITM answers additions directly, so task arithmetic breaks the "
                        "thinking format (trained on first use, minutes)")
    p.add_argument("--protect-energy", type=float, default=demo.DEMO_PROTECT_ENERGY,
                   help=f"passed to rain build (default {demo.DEMO_PROTECT_ENERGY} in the demo)")
    p.add_argument("--projection", default=None, choices=PROJECTIONS,
                   help="passed to rain build (random: the control of DESIGN §6.2's claim)")
    p.add_argument("--build-seed", type=int, default=None,
                   help="rain build --seed (DARE drops, --projection random's subspaces)")
    p.add_argument("--project-layers", default=None, help="passed to rain build, e.g. 0-1 (default all)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the adapters")
    p.add_argument("--retrain", action="store_true",
                   help="train the world from scratch instead of using the shipped (or cached) one")
    p.add_argument("--allow-unsound", action="store_true",
                   help="go on (exit status 1) when the world fails the soundness gate, instead of stopping")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)
