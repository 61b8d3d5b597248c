"""``rain build``: the subcommand, generated from :class:`~rain_adapter.merging.options.BuildOptions`.

One flag per dataclass field, in field order, inside the field's ``group``: ``--`` + name with
``_`` → ``-``; a bool is a switch (``--name`` when its default is False, ``--no-name`` storing
False when it is True, e.g. ``--no-progress``); any other field takes one value converted by its
``parse`` (``int``, ``float``, ``str``, ``parse_int_list`` for ``0-3,8``, ``parse_str_list``), with its
``choices``. Defaults are the dataclass's, so ``rain build`` and ``build_adapter(**kw)`` agree by
construction. Two flags are not build options: ``--debug`` (tracebacks) and ``--list-presets``
(print every ``--preset`` with its LRM / ITM / base and where the choice comes from, then exit 0;
needs no other flag). ``--dry-run`` (:func:`dry_run`) prints ``rain plan``'s plan for the same
options and the resolved ``--device-map``, and exits without loading a weight.

A build's warnings (``BuildWarning``: a near-empty Stage 1, configs that differ) are printed by
the build log itself, also with ``--no-verbose``; the CLI does not repeat them as Python warnings.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import MISSING, Field, fields
from pathlib import Path

from ..merging.errors import BuildError, BuildWarning, HubFetchError
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


def dry_run(opts: BuildOptions) -> str:
    """``rain build --dry-run``: the plan ``rain plan`` prints for the same options (``cli.plan``;
    its ``--profile`` is ``--plan-profile``) and, with ``--device-map``, the map accelerate resolves
    on this machine from the LRM's ``init_empty_weights`` skeleton (an explicit map checked against
    it). Reads the three config.json files and the calibration files; loads no weights, writes
    nothing, needs no GPU (the GPUs a map names are not checked: a plan may be for another machine)."""
    from ..merging import preflight
    from ..merging.dispatch import (format_device_map, map_source, parse_device_map, parse_max_memory,
                                    resolve_device_map)
    from ..merging.methods import get_method
    from ..merging.report import BuildLog
    from ..merging.targets import needs_lrm_weights, wants_stage2
    from .plan import format_plan, make_plan_from_args, plan_args

    opts.validate()
    opts = opts.resolved()
    method = get_method(opts.method)
    stage2 = wants_stage2(opts, method)  # as the build decides: a Stage 2 method, an instruction set, no --no-stage2
    log = BuildLog(opts.verbose)
    try:
        configs = preflight.check_configs(opts, log)
    except HubFetchError as e:  # offline with a preset: rain plan's offline table still plans it
        if opts.device_map is not None:
            raise
        configs = None
        log(f"[rain build] dry run: configs not compared ({e})")
    calib = opts.reasoning_calib if opts.reasoning_calib is None or isinstance(opts.reasoning_calib, (str, Path)) \
        else None
    if opts.reasoning_calib is not None and calib is None:
        raise BuildError("--dry-run needs --reasoning-calib as a file (rain plan reads it)", field="reasoning_calib")
    args = plan_args(model=str(opts.lrm), dtype=opts.dtype, storage=opts.storage, rank=opts.rank,
                     batch_size=opts.batch_size, sequential=opts.sequential, svd_dtype=opts.svd_dtype,
                     no_stage2=not stage2, alpha_grad=opts.alpha_grad,
                     reasoning_calib=None if calib is None else str(calib),
                     instruction_calib=str(opts.instruction_calib) if stage2 else None,
                     max_samples=opts.max_samples, max_seq_len=opts.max_seq_len,
                     stage2_max_samples=opts.stage2_max_samples if opts.stage2_max_samples is not None
                     else opts.max_samples,
                     stage2_max_seq_len=opts.stage2_max_seq_len if opts.stage2_max_seq_len is not None
                     else opts.max_seq_len, radius=opts.radius, profile=opts.plan_profile,
                     device_map=opts.device_map, max_memory=opts.max_memory)
    lines = [f"[rain build] dry run: no weights loaded, nothing written (would write {opts.out})"]
    if not needs_lrm_weights(opts, method):
        lines.append(f"[rain build] note: --method {method.name} runs no LRM forward (no weights loaded, no "
                     "features, no Stage 2): of the plan below only the task-vector stream and the write apply")
    lines.append(format_plan(make_plan_from_args(args)))
    if opts.device_map is not None and configs is not None:
        sk = preflight.skeleton(configs.lrm)
        if sk is None:
            raise BuildError("--device-map: the LRM's config could not be built on the meta device",
                             field="device_map")
        dm = resolve_device_map(parse_device_map(opts.device_map), sk, dtype=opts.model_dtype,
                                max_memory=parse_max_memory(opts.max_memory), where=map_source(opts.device_map))
        lines += ["", "device map (accelerate, resolved on this machine):", format_device_map(dm)]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "list_presets", False):
        print(format_presets())
        return 0
    if args.dry_run:
        print(dry_run(options_from_args(args)))
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BuildWarning)  # the build log prints them already
        build_adapter(options=options_from_args(args))
    return 0
