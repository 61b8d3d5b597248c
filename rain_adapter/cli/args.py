"""Argument helpers shared by the ``rain`` subcommands: one ``--dtype``, one λ grammar, one λ policy.

The tables and rules themselves live in the core (:mod:`rain_adapter.format.dtypes`,
:mod:`rain_adapter.format.lambdas`) because library functions take the same strings; this module
turns them into argparse options so every subcommand spells them the same way.
"""

from __future__ import annotations

from typing import Any

from ..format.dtypes import DTYPES
from ..format.lambdas import parse_lambdas

#: ``--dtype`` choices, from the one dtype table.
DTYPE_CHOICES: tuple[str, ...] = tuple(sorted(DTYPES))

#: Where options go: an ``ArgumentParser`` or one of its (mutually exclusive) argument groups.
Options = Any

#: The λ-list grammar in one line, for help texts.
LAMBDAS_HELP = "comma list of λ values and/or start:stop:step ranges (stop included), e.g. 0,0.5,1 or 0:1.5:0.25"


def add_dtype(parser: Options, *, default: str | None, help: str) -> None:
    """``--dtype NAME`` with the choices of the one dtype table: every subcommand that takes a dtype
    (build, plan, export peft, fidelity, sweep, tune, serve) adds it here, so the accepted names,
    the parsing and the error for a bad name are the same everywhere."""
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=default, help=help)


def add_lambda(parser: Options, *, default: float | None, help: str) -> None:
    """``--lambda L`` (dest ``lam``). A number here; the λ policy is applied where the adapter's
    ``lambda_range`` is known (attach / export), so the CLI and the library agree."""
    parser.add_argument("--lambda", dest="lam", type=float, default=default, help=help)


def add_lambdas(parser: Options, *, default: str | None, help: str) -> None:
    """``--lambdas SPEC`` as a string; parse it with :func:`lambdas_arg` in the handler, so a bad
    spec is reported as ``rain CMD: error: …`` (exit 2) like every other input error."""
    parser.add_argument("--lambdas", default=default, help=f"{help}; {LAMBDAS_HELP}")


def lambdas_arg(spec: str | None) -> list[float] | None:
    """The value of ``--lambdas`` through the one λ grammar (None stays None)."""
    return None if spec is None else parse_lambdas(spec, what="--lambdas")


__all__ = ["DTYPE_CHOICES", "LAMBDAS_HELP", "add_dtype", "add_lambda", "add_lambdas", "lambdas_arg"]
