"""``rain``: the command line. Each subcommand module registers itself via ``add_parser``.

Every module in :data:`COMMAND_MODULES` is imported when the parser is built, and an import error
propagates: a subcommand whose code is broken fails loudly instead of vanishing from ``rain --help``.
Optional third-party packages (fastapi / uvicorn for ``rain serve``, matplotlib for plots) are
imported only when a subcommand runs; a missing one ends that command with the extra to install.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..format.lambdas import LambdaRangeWarning
from ..format.store import os_error_of

#: Modules that add subcommands: each exposes ``add_parser(subparsers) -> None``.
COMMAND_MODULES = (
    "rain_adapter.cli.info",
    "rain_adapter.cli.build",
    "rain_adapter.cli.export",
    "rain_adapter.cli.fidelity",
    "rain_adapter.cli.sweep",
    "rain_adapter.cli.tune",
    "rain_adapter.cli.demo",
    "rain_adapter.cli.serve",
    "rain_adapter.cli.plan",
)

#: optional top-level package -> the extra of pyproject.toml that installs it
OPTIONAL_EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "httpx": "serve", "matplotlib": "eval",
                   "triton": "triton", "sentencepiece": "sentencepiece", "protobuf": "sentencepiece"}

#: Errors a command reports as ``rain CMD: error: …`` (exit 2) instead of a traceback. Input errors
#: are ValueErrors (or subclasses) naming the file / field; a KeyError or TypeError is a bug and
#: shows its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError)
#: OSError numbers of a full disk / a refused write, also reported in one line (exit 2).
DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
ACCESS_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                 errno.EROFS: "read-only file system"}


def make_parser() -> argparse.ArgumentParser:
    """The ``rain`` parser with every subcommand of :data:`COMMAND_MODULES` (imported here)."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="rain", description="RAIN-Merging adapters for large reasoning models: build, inspect, serve, evaluate."
    )
    parser.add_argument("--version", action="version", version=f"rain-adapter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in COMMAND_MODULES:
        importlib.import_module(mod_name).add_parser(sub)
    return parser


def missing_extra(err: ModuleNotFoundError) -> str | None:
    """The pyproject extra that installs the package ``err`` misses, or None if it is not optional."""
    return OPTIONAL_EXTRAS.get((err.name or "").split(".")[0])


@contextmanager
def _plain_lambda_warnings(command: str) -> Iterator[None]:
    """Show a :class:`LambdaRangeWarning` as ``rain CMD: warning: …`` instead of file:line source."""
    with warnings.catch_warnings():
        default_show: Callable = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, LambdaRangeWarning):
                print(f"rain {command}: warning: {message}", file=file or sys.stderr)
            else:
                default_show(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def disk_error_line(command: str, exc: BaseException, args: argparse.Namespace) -> str | None:
    """``rain CMD: error: …`` for a full disk (ENOSPC, EDQUOT) or a refused access (EACCES, EPERM,
    EROFS) found in ``exc`` or its chain of causes; None for any other error."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        err = os_error_of(exc)
        if err is not None and err.errno in DISK_ERRNOS | ACCESS_ERRNOS:
            break
        exc = exc.__cause__ or exc.__context__
    else:
        return None
    where = f" {err.filename}" if err.filename else ""
    elsewhere = "pass --out elsewhere" if hasattr(args, "out") else "write elsewhere"
    if err.errno in DISK_ERRNOS:
        again = "; --resume then reuses the finished layers" if hasattr(args, "resume") else ""
        return (f"rain {command}: error: {DISK_ERRNOS[err.errno]} while writing{where or ' the output'} "
                f"(free space or {elsewhere}{again})")
    return (f"rain {command}: error: {ACCESS_ERRNOS[err.errno]}:{where or ' a file'} "
            f"(check its permissions; for the output, {elsewhere})")


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False) or os.environ.get("RAIN_DEBUG"))


def main(argv: list[str] | None = None) -> int:
    """Run ``rain ARGV``; returns the exit status (2 for input errors, missing extras, a full disk
    and a refused write, each reported in one line without a traceback unless ``--debug``)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with _plain_lambda_warnings(args.command):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        extra = missing_extra(e)
        if extra is None or _debug(args):
            raise
        print(f"rain {args.command}: error: {e.name} is not installed; it comes with the {extra!r} extra: "
              f'pip install -e ".[{extra}]" (or pip install "rain-adapter[{extra}]")', file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        if _debug(args):
            raise
        print(f"rain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a full disk / a refused write: one line; anything else: the traceback
        line = disk_error_line(args.command, e, args)
        if line is None or _debug(args):
            raise
        print(line, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
