"""``rain tune``: the CLI of :mod:`rain_adapter.evaluation.tune` (λ* on the user's own dev prompts).

``rain tune --model LRM --adapter A [--adapter B …] --prompts DEV.jsonl [--out DIR] [--arms FILE]
[--no-write] [--grid 0:3:0.5 --refine-rounds 3 --min-accuracy 0.9 --min-format 0.98 …]``

The dev prompts are ``rain sweep``'s rows (``{prompt, instruction_id_list, kwargs, answer?}``).
Per adapter: the search, its curve with intervals (printed and in ``DIR/tune.json``), the responses
(``DIR/responses.jsonl``, appended before scoring), a plot when matplotlib is installed, and —
unless ``--no-write`` — λ*, the measured range and the report written into the adapter config
(:mod:`rain_adapter.evaluation.tune_write`). ``--arms FILE`` writes an A/B arms file around λ*
(one file per adapter; with several adapters the adapter's name is added to the file name).

``--search KEY=V1/V2`` (repeatable; :mod:`rain_adapter.cli.tune_search`) tunes build settings too:
the one adapter is rebuilt from its recorded build options for every combination (Stage 1's
features computed once and shared through a feature cache), every variant is tuned, and the one
with the highest compliance at its λ* is named. Variants land in ``DIR/variants/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from ..evaluation import sweep
from ..evaluation.answers import resolve_extractor
from ..evaluation.registry import registry_with
from ..evaluation.scoring import score_response
from ..evaluation.plots import plot_sweep_if_available
from ..evaluation.stats import wilson
from ..evaluation.tune import TuneError, TuneOptions, TuneResult, tune_attached
from ..evaluation.tune_write import apply_to_config, check_writable_adapter, write_arms
from ..format.store import resolve_adapter
from .args import add_dtype
from .tune_search import SEARCHABLE, best_variant, build_variants, parse_search

#: ``rain tune --help`` (plain text; the module docstring is for developers)
DESCRIPTION = """\
Find λ*, the λ with the highest instruction compliance within accuracy and thinking-format
floors, on your own dev prompts, and write it into the adapter:

  rain tune --model LRM --adapter A [--adapter B ...] --prompts DEV.jsonl [--out DIR]
            [--arms FILE] [--no-write] [--grid 0:3:0.5 --refine-rounds 3 --min-accuracy 0.9
            --min-format 0.98 ...]

The dev prompts are rain sweep's rows ({prompt, instruction_id_list, kwargs, answer?}). For
each adapter the search and its curve with intervals are printed and written to DIR/tune.json,
the responses to DIR/responses-<adapter>.jsonl (appended before scoring), and a plot when
matplotlib is installed. Unless --no-write is given, λ*, the measured range and the report are
written into the adapter's adapter_config.json. --arms FILE writes an A/B arms file around λ*
(one file per adapter; with several adapters the adapter's name is added to the file name).

--search KEY=V1/V2 (repeatable) tunes build settings too: the one adapter is rebuilt from its
recorded build options for every combination of values (Stage 1's features are computed once
and shared through a feature cache), every variant is tuned, and the one with the highest
compliance at its λ* is named. Variants are written under DIR/variants/."""


def options_from_args(args: argparse.Namespace) -> TuneOptions:
    """The :class:`TuneOptions` a parsed command line stands for."""
    return TuneOptions(**{f.name: getattr(args, f.name) for f in fields(TuneOptions)})


def compare_table(results: dict[str, TuneResult]) -> str:
    """One line per adapter at its λ*: what each gives within the same floors on the same prompts."""
    w = max(24, *(len(n) + 2 for n in results))
    lines = [f"{'adapter':<{w}}{'λ*':>7}  {'compliance [95% CI]':>22}  {'accuracy [95% CI]':>22}  {'format':>6}"]
    for name, r in results.items():
        b = r.best
        c_lo, c_hi = wilson(b.comply_k, b.comply_n, r.confidence)
        a_lo, a_hi = wilson(b.acc_k, b.acc_n, r.confidence)
        lines.append(f"{name:<{w}}{r.recommended_lambda:>7g}  {b.compliance:>7.3f} [{c_lo:.2f}, {c_hi:.2f}]"
                     f"{'':>3}  {b.accuracy:>7.3f} [{a_lo:.2f}, {a_hi:.2f}]{'':>3}  {b.format_validity:>6.3f}")
    return "\n".join(lines)


def _arms_path(base: str, name: str, several: bool) -> Path:
    p = Path(base)
    return p.with_name(f"{p.stem}-{name}{p.suffix or '.json'}") if several else p


def _tune_one(model, tok, adapter: str, name: str, rows, opts: TuneOptions, out: Path,
              quiet: bool, score) -> TuneResult:
    from ..runtime.model import RainAdapter

    resp_path = out / f"responses-{_file_name(name)}.jsonl"
    resp_path.unlink(missing_ok=True)

    def keep(batch: list[dict[str, Any]]) -> None:
        with resp_path.open("a") as f:
            f.writelines(json.dumps({"adapter": name, **r}) + "\n" for r in batch)

    rm = RainAdapter.attach(model, adapter)
    try:
        return tune_attached(rm, tok, rows, opts, score=score, progress=not quiet, on_responses=keep,
                             on_round=None if quiet else (lambda s: print(f"  {name}: {s}")))
    finally:
        rm.detach()


def _targets(args: argparse.Namespace, out: Path) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """(name, adapter) pairs to tune: the ``--adapter`` list, or with ``--search`` the variants of the
    one adapter (built here, before the LRM is loaded for generation)."""
    if not args.search:
        names = sweep.unique_names([sweep.method_name(a) for a in args.adapter])
        return list(zip(names, args.adapter)), {}
    if len(args.adapter) != 1:
        raise ValueError("--search tunes the build settings of one adapter: give exactly one --adapter")
    search = parse_search(args.search)
    variants = build_variants(args.adapter[0], args.model, search, out,
                              feature_cache=Path(args.feature_cache) if args.feature_cache else None)
    info = {name: {"adapter": path, "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in c.items()}}
            for name, path, c in variants}
    return [(name, path) for name, path, _ in variants], info


def _finish_one(args, adapter: str, name: str, res: TuneResult, opts: TuneOptions, n_rows: int,
                several: bool) -> None:
    """Write λ* into the config (unless --no-write) and the arms file (with --arms)."""
    if not args.no_write:
        cfg = apply_to_config(adapter, res, opts=opts, prompts=args.prompts, n_rows=n_rows)
        print(f"wrote default_lambda = recommended_lambda = {cfg.recommended_lambda:g}, lambda_range "
              f"{cfg.lambda_range} into {resolve_adapter(adapter) / 'adapter_config.json'}")
    if args.arms:
        if res.recommended_lambda <= 0:
            raise TuneError(f"{adapter}: λ* = 0, so there are no arms around it; no arms file written")
        print(f"wrote {write_arms(_arms_path(args.arms, name, several), res)}")


def _run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    opts.validate()
    if not args.no_write:  # refuse a Hub snapshot or a broken config before any generation
        for a in args.adapter:
            check_writable_adapter(a)
    registry = registry_with(args.checks or ())  # the same checks as rain sweep and rain serve
    resolve_extractor(args.answer_extract)       # an unknown extractor fails before any generation
    rows = sweep.load_prompts(args.prompts, args.limit, skip_unknown=args.skip_unknown, registry=registry)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    targets, variants = _targets(args, out)

    def score(row, response):
        return score_response(row, response, registry=registry, extract=args.answer_extract)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = sweep.load_model(args.model, args.device, args.dtype)
    report: dict[str, Any] = {"prompts": str(args.prompts), "rows": len(rows), "adapters": {}}
    results: dict[str, TuneResult] = {}
    failed: list[str] = []
    for name, adapter in targets:
        res = results[name] = _tune_one(model, tok, adapter, name, rows, opts, out, args.quiet, score)
        print(res.format_table(name))
        unscored = {p.lam: p.unscored for p in res.points if p.unscored}
        if unscored:  # left out of the n above, and said so: never silently dropped
            top = max((r for p in res.points for r in p.unscored_reasons.items()), key=lambda kv: kv[1])
            print(f"rain tune: warning: {name}: rows with a check or answer that could not be scored were left "
                  f"out of the rates (λ: rows) {unscored}; most often {top[0]} (×{top[1]}); all reasons in "
                  f"{out / 'tune.json'}", file=sys.stderr)
        report["adapters"][name] = {"adapter": str(adapter), **variants.get(name, {}), **res.to_dict()}
        recs = [{"method": name, "lambda": p.lam, "compliance": p.compliance, "accuracy": p.accuracy,
                 "format_validity": p.format_validity} for p in res.points]
        plot_sweep_if_available(recs, out / f"tune-{_file_name(name)}.png", title=f"rain tune: {name}")
        # the report first: it stays on disk whatever the config write below decides
        (out / "tune.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        try:
            _finish_one(args, adapter, _file_name(name), res, opts, len(rows), len(targets) > 1)
        except TuneError as e:   # one adapter without a useful λ does not stop the others
            print(f"rain tune: error: {e}", file=sys.stderr)
            failed.append(name)
    if len(results) > 1:
        print(compare_table(results))
    if variants:
        best = best_variant(results)
        report["best"] = best
        print(f"best settings: {best} → {variants[best]['adapter']}")
    (out / "tune.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"{len(rows)} prompts × {len(targets)} adapter(s) in {time.time() - t0:.1f}s; wrote "
          f"{out / 'tune.json'}")
    return 1 if failed else 0


def _file_name(name: str) -> str:
    """A display name as a file-name part (variant names carry spaces and parentheses)."""
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name).strip("_")


def add_parser(subparsers) -> None:
    """Register ``rain tune``: model flags by hand, the search flags generated from TuneOptions."""
    p = subparsers.add_parser("tune", help="find λ*, the highest instruction compliance within accuracy and "
                              "thinking-format floors, on your own dev prompts; write it into the adapter",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the LRM (HF directory or hub id)")
    p.add_argument("--adapter", action="append", required=True, help="adapter dir / name (repeatable)")
    p.add_argument("--prompts", required=True, help="dev JSONL of {prompt, instruction_id_list, kwargs, answer?}")
    p.add_argument("--out", default="rain-tune", help="report directory (default ./rain-tune)")
    p.add_argument("--arms", default=None, help="write an A/B arms file (below / tuned / above λ*) here")
    p.add_argument("--no-write", action="store_true", help="report only; leave the adapter config alone")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--search", action="append", metavar="KEY=V1/V2",
                   help="also tune a build setting of the (one) adapter: rebuild it for every value from its "
                        "recorded build options, sharing one Stage 1 feature cache, and tune each "
                        f"(repeatable; keys: {', '.join(SEARCHABLE)}; values separated by /)")
    p.add_argument("--feature-cache", default=None, metavar="DIR",
                   help="with --search: where the Stage 1 features are kept (default <out>/features)")
    p.add_argument("--skip-unknown", action="store_true",
                   help="score rows on the checks this library knows and count the others (default: error)")
    p.add_argument("--checks", action="append", metavar="MOD",
                   help="a Python module (dotted name or .py path) of checks, as for rain sweep (repeatable)")
    p.add_argument("--answer-extract", default=None, metavar="NAME",
                   help="answer extractor for accuracy: number (default), last_number, exact, choice, "
                        "regex:PATTERN or module:function; a row's answer_extract overrides it")
    g = p.add_argument_group("search")
    for f in fields(TuneOptions):
        g.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=f.default,
                       help=f"{f.metadata['help']} (default {f.default})")
    p.add_argument("--device", default=None)
    add_dtype(p, default="float32", help="the LRM's dtype (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)
