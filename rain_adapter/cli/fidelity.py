"""``rain fidelity``: the CLI of :mod:`rain_adapter.export.fidelity`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..export import fidelity
from .args import add_dtype, add_lambda

#: ``rain fidelity --help`` (plain text; rain_adapter.export.fidelity's docstring is for developers)
DESCRIPTION = """\
Measure what a low-rank factorisation costs on real forward passes: how far the model's
next-token distributions move when the dense delta D is replaced by its low-rank B·A.

At strength λ (--lambda, default 1), on calibration text, with the LRM loaded once:

  P_ref  = next-token distribution of the LRM + λ·D      (the dense adapter)
  P_cand = next-token distribution of the LRM + λ·B·A    (the low-rank adapter)
  P_0    = next-token distribution of the bare LRM

it reports KL(P_ref ‖ P_cand) per token (mean, p95, max) and how often the top-1 tokens of
P_ref and P_cand agree, and, as the yardstick, the adapter's own effect: KL(P_ref ‖ P_0) and
the top-1 agreement with the bare LRM. kl_ratio = mean KL(ref ‖ cand) / mean KL(ref ‖ bare) is
the share of the adapter's effect that the factorisation gets wrong (0 = perfect, 1 = as far off
as not attaching anything).

What is compared with what:

  ADAPTER --dense-twin DIR   a low-rank ADAPTER against DIR, the same build stored dense
                             (rain build ... --storage dense)
  ADAPTER --rank R           a dense ADAPTER against its compression at rank R, or keeping
  ADAPTER --rank-energy E    the fraction E of Σσ² per module, done in memory: the way to
                             choose a rank before building with it

A low-rank ADAPTER with neither is an error (B·A is its own reconstruction).

--calib is a JSON list or JSONL of samples with prompt and response (reasoning optional), each
rendered with the LRM's chat template as in Stage 1, or plainly concatenated when the tokenizer
has none. Every token position counts, up to --max-seq-len tokens of --max-samples samples."""


def _run(args: argparse.Namespace) -> int:
    r = fidelity.run_fidelity(
        args.lrm, args.adapter, args.calib, dense_twin=args.dense_twin, rank=args.rank,
        rank_energy=args.rank_energy, max_rank=args.max_rank, lam=args.lam, max_samples=args.max_samples,
        max_seq_len=args.max_seq_len, device=args.device, dtype=args.dtype,
        check_fingerprint=not args.no_check_fingerprint, progress=not args.quiet,
    )
    print(fidelity.format_result(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


def add_parser(subparsers) -> None:
    """``rain fidelity --lrm PATH ADAPTER --calib FILE [--dense-twin DIR | --rank R | --rank-energy E]``."""
    p = subparsers.add_parser(
        "fidelity", help="KL / top-1 agreement of a low-rank adapter vs its dense twin on real forward passes",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", help="the adapter (low-rank with --dense-twin; dense with --rank/--rank-energy)")
    p.add_argument("--lrm", required=True, help="the LRM checkpoint directory")
    p.add_argument("--calib", required=True, help="calibration JSON / JSONL (prompt, [reasoning], response)")
    p.add_argument("--dense-twin", default=None, help="the same build stored dense (--storage dense)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rank", type=int, default=None, help="compress the dense ADAPTER at this rank, in memory")
    g.add_argument("--rank-energy", type=float, default=None, help="compress keeping this fraction of Σσ² per module")
    p.add_argument("--max-rank", type=int, default=None)
    add_lambda(p, default=1.0, help="strength to compare at (default 1)")
    p.add_argument("--max-samples", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--device", default=None)
    add_dtype(p, default="float32", help="the LRM's dtype for the forward passes (default float32)")
    p.add_argument("--no-check-fingerprint", action="store_true",
                   help="compare even if the LRM's weights differ from the ones the adapter was built for")
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)
