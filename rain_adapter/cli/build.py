"""``rain build``: the subcommand, generated from :class:`~rain_adapter.merging.options.BuildOptions`.

One flag per dataclass field, in field order, inside the field's ``group``: ``--`` + name with
``_`` → ``-``; a bool is a switch (``--name`` when its default is False, ``--no-name`` storing
False when it is True, e.g. ``--no-progress``); any other field takes one value converted by its
``parse`` (``int``, ``float``, ``str``, ``parse_int_list`` for ``0-3,8``, ``parse_str_list``), with its
``choices``. Defaults are the dataclass's, so ``rain build`` and ``build_adapter(**kw)`` agree by
construction. Two flags are not build options: ``--debug`` (tracebacks) and ``--list-presets``
(print every ``--preset`` with its LRM / ITM / base and where the choice comes from, then exit 0;
needs no other flag).

A build's warnings (``BuildWarning``: a near-empty Stage 1, configs that differ) are printed by
the build log itself, also with ``--no-verbose``; the CLI does not repeat them as Python warnings.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import MISSING, Field, fields

from ..merging.errors import BuildWarning
from ..merging.methods import REGISTRY
from ..merging.options import GROUPS, BuildOptions, flag
from ..merging.pipeline import build_adapter
from ..merging.presets import format_presets
from .args import add_dtype

DESCRIPTION = ("Stream the ITM−base task vector, project it away from the LRM's inputs at the thinking "
               "positions (Stage 1), optionally compute per-head coefficients (Stage 2), write the adapter.")


def _add_option(group: argparse._ArgumentGroup, f: Field) -> None:
    """One BuildOptions field → one flag (see the module docstring)."""
    md, default = f.metadata, f.default
    assert default is not MISSING, f"BuildOptions.{f.name} needs a default to become a flag"
    if f.name == "dtype":  # the one --dtype of every subcommand (same table, same error)
        add_dtype(group, default=default, help=md["help"])
        return
    if isinstance(default, bool):
        if default:
            group.add_argument("--no-" + flag(f.name)[2:], dest=f.name, action="store_false",
                               help=md["help"])
        else:
            group.add_argument(flag(f.name), dest=f.name, action="store_true", help=md["help"])
        return
    group.add_argument(flag(f.name), dest=f.name, type=md["parse"], default=default, choices=md["choices"],
                       help=md["help"])


def make_build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every BuildOptions field (and ``--debug``, ``--list-presets``) to ``p``, grouped as in
    :data:`GROUPS`."""
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for f in fields(BuildOptions):
        _add_option(groups[f.metadata["group"]], f)
    groups["models"].add_argument("--list-presets", action="store_true",
                                  help="print every --preset (LRM / ITM / base, and where it comes from) and exit")
    groups["storage and compute"].add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    """The BuildOptions a parsed ``rain build`` command line stands for."""
    return BuildOptions(**{f.name: getattr(args, f.name) for f in fields(BuildOptions)})


def add_parser(subparsers) -> None:
    """Register ``rain build``."""
    methods = "; ".join(f"{m.name}: {m.description}" for m in REGISTRY.values())
    p = subparsers.add_parser("build", help="build a RAIN adapter from an LRM, an ITM and the ITM's base",
                              description=DESCRIPTION, epilog=f"methods: {methods}")
    make_build_parser(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "list_presets", False):
        print(format_presets())
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BuildWarning)  # the build log prints them already
        build_adapter(options=options_from_args(args))
    return 0
