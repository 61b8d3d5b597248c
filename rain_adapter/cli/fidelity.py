"""``rain fidelity``: the CLI of :mod:`rain_adapter.export.fidelity`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..export import fidelity
from .args import add_dtype, add_lambda


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
        description=fidelity.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.add_argument("--no-check-fingerprint", action="store_true")
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)
