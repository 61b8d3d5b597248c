"""``rain plan``: predict a build's memory, disk, FLOPs and time before starting it (docs/DESIGN.md §5.6).

    rain plan --preset qwen14b --profile h200 --dtype bfloat16 [--stage2] [--json]
    rain plan --model DIR|config.json [--count-tokens] --profile cpu --tflops 0.09 ...

The model is ``rain_adapter.merging.plan``; nothing but configs and calibration files is read (and,
with ``--count-tokens``, the local LRM's tokenizer).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from ..merging.plan import (GiB, PROFILES, REFERENCE_CONFIGS, BuildPlan, CalibShape, ModelShape, PlanError,
                          PlanOptions, estimate_calib, make_plan)
from .args import add_dtype

#: ``rain plan --help`` (plain text; the module docstring is for developers)
DESCRIPTION = """\
Predict a build's memory, disk, FLOPs and time before starting it:

  rain plan --preset qwen14b --profile h200 --dtype bfloat16 [--stage2] [--json]
  rain plan --model DIR|config.json [--count-tokens] --profile cpu --tflops 0.09 ...

No weights are loaded: only the model's config and the calibration files are read (and, with
--count-tokens, the local LRM's tokenizer). The device is a named --profile; any of the device
options below overrides one of its numbers."""

#: --flag → DeviceProfile field (overrides of the named profile)
PROFILE_FLAGS = {"tflops": "tflops", "fp32_tflops": "fp32_tflops", "mem_gbps": "mem_gbps", "disk_gbps": "disk_gbps",
                 "link_gbps": "link_gbps", "device_memory": "memory_gib", "cores": "cores", "fwd_eff": "fwd_eff",
                 "svd_eff": "svd_eff", "startup_s": "startup_s", "base_gib": "base_gib",
                 "module_latency_s": "module_latency_s"}


def load_model_shape(args: argparse.Namespace) -> tuple[ModelShape, str | None]:
    """(shape, local LRM dir or None) from --preset (offline table) or --model (dir, config.json, or a
    Hub id of the table)."""
    if args.preset:
        from ..merging.presets import get_preset

        lrm = get_preset(args.preset).lrm
        if lrm not in REFERENCE_CONFIGS:
            raise PlanError(f"preset {args.preset!r}: no offline config for its LRM {lrm}; pass --model DIR")
        return ModelShape.from_config(REFERENCE_CONFIGS[lrm], lrm), None
    if not args.model:
        raise PlanError("give --preset NAME or --model DIR|config.json")
    if args.model in REFERENCE_CONFIGS:
        return ModelShape.from_config(REFERENCE_CONFIGS[args.model], args.model), None
    p = Path(args.model).expanduser()
    cfg_path = p / "config.json" if p.is_dir() else p
    if not cfg_path.is_file():
        raise PlanError(f"--model {args.model}: no config.json there (a local dir, a config.json, or one of "
                        f"{sorted(REFERENCE_CONFIGS)})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"{cfg_path}: unreadable config ({e})") from e
    if not isinstance(cfg, dict):
        raise PlanError(f"{cfg_path}: not a JSON object")
    return ModelShape.from_config(cfg, str(cfg_path)), str(p) if p.is_dir() else None


def load_calib(args: argparse.Namespace, lrm_dir: str | None) -> tuple[CalibShape, CalibShape | None]:
    """Reasoning (Stage 1) and instruction (Stage 2, when asked for) calibration sizes."""
    from ..merging.calibration import load_samples
    from ..format.paths import calibration_dir

    if args.samples is not None:
        if not args.tokens_per_sample:
            raise PlanError("--samples needs --tokens-per-sample")
        per = args.positions_per_sample or 2 * (args.radius + 1)
        calib = CalibShape((args.tokens_per_sample,) * args.samples, per * args.samples, "given numbers")
    elif args.count_tokens:
        calib = _count_tokens(args, lrm_dir)
    else:
        path = Path(args.reasoning_calib) if args.reasoning_calib else calibration_dir() / "reasoning_calibration_set.json"
        calib = estimate_calib(load_samples(path), ("prompt", "reasoning"), radius=args.radius,
                               max_samples=args.max_samples, max_seq_len=args.max_seq_len,
                               tokens_per_char=args.tokens_per_char, source=path.name)
    instr = None
    if (args.stage2 or args.instruction_calib) and not args.no_stage2:
        path = Path(args.instruction_calib) if args.instruction_calib else \
            calibration_dir() / "instruction_calibration_set.jsonl"
        instr = estimate_calib(load_samples(path, ("prompt", "response")), ("prompt", "response"), radius=None,
                               max_samples=args.stage2_max_samples, max_seq_len=args.stage2_max_seq_len,
                               tokens_per_char=args.tokens_per_char, source=path.name)
    return calib, instr


def _count_tokens(args: argparse.Namespace, lrm_dir: str | None) -> CalibShape:
    """Exact lengths and Ω through the LRM's own tokenizer, as the build prepares them."""
    if lrm_dir is None:
        raise PlanError("--count-tokens needs --model DIR holding the LRM's tokenizer")
    from ..format.tokenizer import load_tokenizer
    from ..merging.calibration import prepare_reasoning_calibration

    c = prepare_reasoning_calibration(load_tokenizer(lrm_dir), args.reasoning_calib, radius=args.radius,
                                      max_samples=args.max_samples, max_seq_len=args.max_seq_len, min_samples=1)
    return CalibShape(tuple(len(it.input_ids) for it in c.items), c.n_positions, "tokenized", True)


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}" if x < 10 * GiB else f"{x / GiB:.1f}"


def _time(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def format_plan(plan: BuildPlan) -> str:
    """The readable table."""
    m, c, o, p = plan.model, plan.calib, plan.options, plan.profile
    lines = [
        f"model:       {m.name}: {m.params / 1e9:.2f}B params (hidden {m.hidden}, intermediate {m.intermediate}, "
        f"{m.layers} layers, {m.heads}/{m.kv_heads} heads), checkpoints {m.ckpt_dtype}",
        f"build:       --dtype {o.dtype}, --storage {o.storage}{f' --rank {o.rank}' if o.rank else ''}, "
        f"--batch-size {o.batch_size}{', --sequential' if o.sequential else ''}, "
        f"Stage 2 {'on (%d pass)' % o.stage2_passes if plan.instr else 'off'}",
        f"calibration: {c.samples} samples, {c.tokens:,} tokens (longest {max(c.lengths)}), {c.positions:,} Ω rows"
        f" [{c.source}]",
    ]
    if plan.instr:
        lines.append(f"stage 2 set: {plan.instr.samples} samples, {plan.instr.tokens:,} tokens [{plan.instr.source}]")
    mem = f"{p.memory_gib:g} GiB" if p.memory_gib else "host memory"
    lines.append(f"profile:     {p.name} ({p.kind}; {p.tflops:g} TFLOPS 16-bit, {p.fp32_tflops:g} fp32, fwd_eff "
                 f"{p.fwd_eff:g}, svd_eff {p.svd_eff:g}; memory {p.mem_gbps:g} GB/s, disk {p.disk_gbps:g} GB/s, "
                 f"link {p.link_gbps:g} GB/s; {mem})")
    head = f"{'stage':<18} {'time':>10} {'TFLOP':>9} {'host anon':>10} {'host RSS':>9} {'device':>8}  (GiB)  note"
    lines += ["", head, "-" * len(head)]
    for s in plan.stages:
        lines.append(f"{s.name:<18} {_time(s.seconds):>10} {s.flops / 1e12:>9.2f} {_gib(s.host_anon):>10} "
                     f"{_gib(s.host_rss):>9} {_gib(s.device):>8}         {s.note}")
    lines.append(f"{'total / peak':<18} {_time(plan.seconds):>10} {sum(s.flops for s in plan.stages) / 1e12:>9.2f} "
                 f"{_gib(plan.peak('host_anon')):>10} {_gib(plan.peak('host_rss')):>9} {_gib(plan.peak('device')):>8}")
    d = plan.disk
    lines += ["", f"disk (GiB):  downloads {_gib(d['downloads'])} (LRM + ITM + base), partial cache "
                  f"{_gib(d['partial_cache'])}, adapter {_gib(d['adapter'])}, peak during the build "
                  f"{_gib(d['peak_during_build'])} (cache + adapter)"]
    if plan.placement is not None:
        pl = plan.placement
        dm = o.device_map if isinstance(o.device_map, str) else "JSON map"
        moved = (f"{pl.offloaded / GiB:.2f} GiB offloaded, brought in for every forward "
                 f"({pl.streamed_seconds(p.link_gbps, p.disk_gbps):.2f} s each)" if pl.offloaded > 0
                 else "nothing offloaded")
        lines.append(f"device map:  --device-map {dm}: weights {pl.summary()}; {moved}")
    if plan.advice:
        lines.append(f"device:      {plan.advice}")
    return "\n".join(lines)


def make_plan_from_args(args: argparse.Namespace) -> BuildPlan:
    """The plan for ``rain plan``'s arguments (``rain build --dry-run`` passes the same names, see
    :func:`plan_args`)."""
    from ..merging.dispatch import parse_device_map, parse_max_memory

    m, lrm_dir = load_model_shape(args)
    calib, instr = load_calib(args, lrm_dir)
    if args.profile not in PROFILES:
        raise PlanError(f"--profile {args.profile!r}: choose one of {sorted(PROFILES)}")
    prof = replace(PROFILES[args.profile], **{f: getattr(args, a) for a, f in PROFILE_FLAGS.items()
                                              if getattr(args, a) is not None})
    dm = parse_device_map(args.device_map)
    mm = parse_max_memory(args.max_memory)
    opts = PlanOptions(dtype=args.dtype, storage=args.storage, rank=args.rank, batch_size=args.batch_size,
                       sequential=args.sequential, stage2=instr is not None,
                       stage2_passes=2 if args.alpha_grad == "gain" else 1, svd_dtype=args.svd_dtype,
                       device_map=dm, max_memory={str(k): v for k, v in mm.items()} if mm else None)
    return make_plan(m, calib, opts, prof, instr)


def plan_args(**given) -> argparse.Namespace:
    """``rain plan``'s parsed arguments: its defaults with ``given`` laid over them (unknown names
    are an error), so ``rain build --dry-run`` plans exactly what ``rain plan`` would."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_arguments(parser)
    args = parser.parse_args([])
    unknown = sorted(set(given) - set(vars(args)))
    if unknown:
        raise TypeError(f"plan_args: unknown rain plan arguments {unknown}")
    for k, v in given.items():
        setattr(args, k, v)
    return args


def _run(args: argparse.Namespace) -> int:
    plan = make_plan_from_args(args)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def add_parser(sub) -> None:
    """Register ``rain plan``."""
    p = sub.add_parser("plan", help="predict a build's memory, disk, FLOPs and time (no weights loaded)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=_run)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a rain build preset (offline config table)")
    p.add_argument("--model", help="the LRM: a dir with config.json, a config.json, or a preset LRM's Hub id")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    g = p.add_argument_group("build options (as rain build)")
    add_dtype(g, default="float32", help="LRM dtype for the forwards (default float32, as rain build)")
    g.add_argument("--storage", default="dense", choices=["dense", "lowrank"])
    g.add_argument("--rank", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--sequential", action="store_true")
    g.add_argument("--device-map", default=None, help="as rain build: auto, balanced, balanced_low_0, sequential, "
                   "cpu, or a JSON object / file {module: device} (GPU index, cpu, disk): weights per device, "
                   "offloaded bytes streamed per forward")
    g.add_argument("--max-memory", default=None, help="with a --device-map strategy: JSON object / file "
                   "{device: size}, e.g. '{\"0\": \"75GiB\", \"1\": \"75GiB\", \"cpu\": \"200GiB\"}' "
                   "(default: the profile's device memory for GPU 0)")
    g.add_argument("--svd-dtype", default="float32", choices=["float32", "float64"])
    g.add_argument("--stage2", action="store_true", help="include Stage 2 with the packaged instruction set")
    g.add_argument("--no-stage2", action="store_true")
    g.add_argument("--alpha-grad", default="level", choices=["level", "gain"], help="gain: two passes a sample")
    c = p.add_argument_group("calibration (default: the packaged sets, tokens estimated from characters)")
    c.add_argument("--reasoning-calib", default=None)
    c.add_argument("--instruction-calib", default=None, help="runs Stage 2 on this set")
    c.add_argument("--max-samples", type=int, default=None)
    c.add_argument("--max-seq-len", type=int, default=4096)
    c.add_argument("--stage2-max-samples", type=int, default=None)
    c.add_argument("--stage2-max-seq-len", type=int, default=4096)
    c.add_argument("--radius", type=int, default=5)
    c.add_argument("--tokens-per-char", type=float, default=None, help="e.g. 1.0 for a byte-level tokenizer")
    c.add_argument("--count-tokens", action="store_true", help="exact lengths with the --model dir's tokenizer")
    c.add_argument("--samples", type=int, default=None, help="given numbers instead of a file: samples ...")
    c.add_argument("--tokens-per-sample", type=int, default=None)
    c.add_argument("--positions-per-sample", type=int, default=None)
    d = p.add_argument_group("device (a named profile, any number overridden)")
    d.add_argument("--profile", default="cpu", help=f"one of {', '.join(PROFILES)} (default cpu)")
    for a in PROFILE_FLAGS:
        d.add_argument("--" + a.replace("_", "-"), type=int if a == "cores" else float, default=None,
                       help="GiB" if a == "device_memory" else None)
