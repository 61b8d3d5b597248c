"""``rain``: the command line. Each area registers its own subcommands via ``add_parser``."""

from __future__ import annotations

import argparse
import importlib
import sys

#: Modules that add subcommands: each exposes ``add_parser(subparsers)``.
_COMMAND_MODULES = (
    "rain_adapter.cli.info",
    "rain_adapter.build.pipeline",
    "rain_adapter.export.peft",
    "rain_adapter.export.fidelity",
    "rain_adapter.evaluation.sweep",
    "rain_adapter.demo.run",
    "rain_adapter.cli.serve",
)


def make_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="rain", description="RAIN-Merging adapters for large reasoning models: build, inspect, serve, evaluate."
    )
    parser.add_argument("--version", action="version", version=f"rain-adapter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:  # area not installed in this build
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, TypeError, NotImplementedError) as e:
        if getattr(args, "debug", False) or __import__("os").environ.get("RAIN_DEBUG"):
            raise
        print(f"rain {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
