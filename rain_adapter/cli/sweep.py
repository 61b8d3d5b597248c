"""``rain sweep``: the CLI of :mod:`rain_adapter.evaluation.sweep` (resume: :mod:`rain_adapter.evaluation.responses`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..evaluation import responses, sweep
from ..evaluation.answers import resolve_extractor
from ..evaluation.plots import NO_PLOT_HINT, plot_sweep_if_available
from ..evaluation.registry import registry_with
from .args import add_dtype, add_lambdas, lambdas_arg

#: ``rain sweep --help`` (plain text; rain_adapter.evaluation.sweep's docstring is for developers)
DESCRIPTION = """\
Generate at several λ per adapter and score instruction compliance, thinking format and accuracy:

  rain sweep --model LRM --adapter A [--adapter B ...] --prompts FILE [--lambdas 0:1.5:0.25]
             [--out DIR] [--max-new-tokens N] [--checks MOD ...] [--answer-extract NAME]
             [--skip-unknown] [--no-resume]

The prompts file is JSONL (or a JSON list) of IFEval-style rows {prompt, instruction_id_list,
kwargs, answer?, answer_extract?}. An instruction id is a built-in IFEval id, a declarative
spec:* check, or a Python check (module:function, or a module given with --checks). Unknown ids
and invalid spec:* kwargs are errors when the file is loaded (--skip-unknown counts them
instead).

Generation is greedy. Each adapter is attached once and every batch mixes several λ, one per
row. λ = 0 is the bare LRM whatever the adapter: it is generated once, with the first adapter,
and its responses are reused (and scored) for every adapter's λ = 0. Per adapter and λ:
prompt-level compliance (thinking stripped), instruction-level compliance, thinking-format
validity, thinking rate and accuracy (rows with an answer), each with the number of rows it was
scored on. A check that cannot be scored is left out of the rates and listed with its reason in
unscored.json.

Writes sweep.csv, responses.jsonl (appended as each batch of responses finishes, before
scoring; its settings in responses.settings.json) and sweep.png (when matplotlib is installed)
under --out. The progress bar counts the rows to generate and shows an ETA.

Resume: running the same command again with the same --out (e.g. after a kill) reuses the
responses already in responses.jsonl and generates only the missing ones, so a killed sweep
loses at most the batch it was generating. A response is reused only when its key matches: the
same LRM (path, config, tokenizer and chat template, weight files; a Hub id: the id), --dtype,
--device, --max-new-tokens, torch and transformers versions, the same adapter (its config and
weight files), λ, prompt index and prompt text. A responses.jsonl written with other settings,
or holding responses this command would not write (other adapters or a rebuilt one, prompts, λ
or --name), is an error (exit 2): pass --no-resume to start over (it empties the file), or use
another --out."""


def _report_unscored(unscored: list[dict[str, Any]], out: Path) -> None:
    """Write ``unscored.json`` and print one line when any check or answer could not be scored."""
    if not unscored:
        return
    summary = sweep.summarize_unscored(unscored)
    path = out / "unscored.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    top = summary["reasons"][0]
    print(f"unscored: {summary['total']} check(s) in {len({(u['method'], u['lambda'], u['index']) for u in unscored})} "
          f"response(s), {len(summary['reasons'])} reason(s); most often {top['check']}: {top['reason'][:120]} "
          f"(×{top['count']}); see {path}")


def _run(args: argparse.Namespace) -> int:
    lambdas = lambdas_arg(args.lambdas)
    registry = registry_with(args.checks or ())  # imports module:function ids on first use
    resolve_extractor(args.answer_extract)  # an unknown extractor is an error before any generation
    rows = sweep.load_prompts(args.prompts, args.limit, skip_unknown=args.skip_unknown, registry=registry)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    # appended to per batch, before scoring; resumed from unless --no-resume, checked before loading
    settings = responses.run_settings(args.model, dtype=args.dtype, device=args.device,
                                  max_new_tokens=args.max_new_tokens)
    log = responses.ResponseLog(out / "responses.jsonl", settings, resume=not args.no_resume)
    labels = sweep.sweep_labels(args.adapter, args.name)
    log.check(log.expected(labels, [responses.adapter_identity(a) for a in args.adapter], rows, lambdas))
    if log.resumed:
        print(f"resuming: {log.resumed} responses in {log.path} are reused (--no-resume starts over)")
    model, tok = sweep.load_model(args.model, args.device, args.dtype)
    (out / "unscored.json").unlink(missing_ok=True)
    t0 = time.time()
    unscored: list[dict[str, Any]] = []
    records = sweep.sweep_adapters(model, tok, args.adapter, rows, lambdas, names=args.name,
                                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                   progress=not args.quiet, responses_log=log, registry=registry,
                                   answer_extract=args.answer_extract, unscored_out=unscored)
    sweep.write_csv(records, out / "sweep.csv")
    _report_unscored(unscored, out)
    png = plot_sweep_if_available(records, out / "sweep.png")
    if png is None:
        print(NO_PLOT_HINT)
    print(sweep.format_table(records))
    print(f"{len(rows)} prompts × {len(lambdas)} λ × {len(args.adapter)} adapters in {time.time() - t0:.1f}s; "
          f"wrote {out / 'sweep.csv'}" + (f", {png}" if png else ""))
    return 0


def add_parser(subparsers) -> None:
    """Register ``rain sweep``."""
    p = subparsers.add_parser("sweep", help="generate at several λ per adapter and score instruction "
                              "compliance, thinking format and accuracy",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the LRM (HF directory or hub id)")
    p.add_argument("--adapter", action="append", required=True, help="adapter dir / name (repeatable)")
    p.add_argument("--name", action="append", help="display name per --adapter (default: its method)")
    add_lambdas(p, default="0:1.5:0.25", help="λ grid (default 0:1.5:0.25)")
    p.add_argument("--prompts", required=True,
                   help="JSONL of {prompt, instruction_id_list, kwargs, answer?, answer_extract?}")
    p.add_argument("--out", default="rain-sweep", help="output directory (default ./rain-sweep)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64, help="rows per generate call (mixed λ)")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--skip-unknown", action="store_true",
                   help="score rows on the instruction ids this library knows and count the others "
                        "(default: unknown ids are an error)")
    p.add_argument("--checks", action="append", metavar="MOD",
                   help="a Python module (dotted name or .py path) of checks: RAIN_CHECKS = {id: fn}, else its "
                        "public functions as MOD:fn (repeatable)")
    p.add_argument("--answer-extract", default=None, metavar="NAME",
                   help="default answer extractor for accuracy: number (default), last_number, exact, choice, "
                        "regex:PATTERN or module:function; a row's answer_extract overrides it")
    p.add_argument("--device", default=None)
    add_dtype(p, default="float32", help="the LRM's dtype (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-resume", action="store_true",
                   help="start over: empty --out's responses.jsonl instead of resuming from it (default: reuse "
                        "the responses of an earlier run of the same command there and generate only the missing "
                        "ones; a file written with other settings, adapters, prompts, λ or --name is an error)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)
