"""``rain build``: LRM + ITM + base + calibration → adapter directory (DESIGN.md §5, §6).

Pipeline (each step fails with a clear message before anything is written):

1. validate options; resolve a ``--preset``; refuse an existing output (unless ``--overwrite``);
2. tokenizer + reasoning calibration → token ids and thinking positions Ω (``calibration``);
3. load the LRM once (``AutoModelForCausalLM``, ``dtype=``), pick the targeted linears (``arch``);
4. check the ITM / base shards against the LRM's module names and shapes (headers only);
5. per layer: features X at Ω (``features``; one pass or ``--sequential``), then per module the
   streamed Δ_I (``taskvector``) → Stage 1 projection (``nullspace``) or a baseline transform
   (``baselines``); each finished layer is cached in ``<out>.partial/`` so ``--resume`` continues;
6. Stage 2 (``coefficients.run_stage2``) when an instruction calibration set is given;
7. ``--storage lowrank``: ``lowrank.compress``;
8. fingerprint + config + atomic ``store.save_adapter``; the partial cache is removed.

Memory: the LRM once (its safetensors are memory-mapped: the weights count as file-backed,
reclaimable RSS, not as anonymous memory), one layer's forward work and features, one module's Δ
at a time. Finished layers go to the partial cache and leave memory; at the end they are
memory-mapped back (file-backed again) and streamed into the final write. Without Stage 2 the LRM
is released before that, so the peak is max(LRM + one layer's work, adapter), not their sum.
Measured on a 97.6M-parameter Qwen2 (bench/build.py, bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .methods import (DEFAULT_DENSITY, DEFAULT_DROP, METHODS, check_method, module_generator, needs_projection,
                        transform)
from .calibration import DEFAULT_MIN_SAMPLES, DEFAULT_RADIUS, prepare_reasoning_calibration
from ..format.delta import ModuleDelta
from .features import trim_heap
from .nullspace import DEFAULT_PROTECT_ENERGY, DEFAULT_RIDGE, PROJECTIONS, project
from .presets import PRESETS, get_preset, preset_output_name

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
PARTIAL_SUFFIX = ".partial"


class BuildError(ValueError):
    """A build that cannot proceed; the message says which input is wrong."""


def _dtype(name: str, what: str) -> torch.dtype:
    if name not in _DTYPES:
        raise BuildError(f"{what} must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def _save_layer(path: Path, deltas: dict[str, ModuleDelta], stats: dict[str, dict]) -> None:
    """Atomically write one finished layer of the partial cache (safetensors + json)."""
    from safetensors.torch import save_file

    flat = {}
    for n, d in deltas.items():
        flat[n + ".delta"] = d.delta.contiguous()
        if d.bias is not None:
            flat[n + ".bias"] = d.bias.contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(flat, str(tmp))
    (path.with_suffix(".json.tmp")).write_text(json.dumps(stats))
    os.replace(path.with_suffix(".json.tmp"), path.with_suffix(".json"))
    os.replace(tmp, path)


def _load_layer(path: Path) -> tuple[dict[str, ModuleDelta], dict[str, dict]]:
    """One cached layer. ``load_file`` memory-maps the file (safetensors ≥ 0.4): the tensors are
    copy-on-write views of the page cache, so holding every layer until the final write costs
    reclaimable file pages, not anonymous memory."""
    from safetensors.torch import load_file

    flat = load_file(str(path))
    stats = json.loads(path.with_suffix(".json").read_text())
    out = {}
    for k in flat:
        if k.endswith(".delta"):
            n = k[: -len(".delta")]
            out[n] = ModuleDelta(delta=flat[k], bias=flat.get(n + ".bias"))
    return out, stats


def format_stats_table(stats: dict[str, dict]) -> str:
    """Per module: rows, protected rank, residual ‖Δ⊥X‖/‖ΔX‖ next to kept norm ‖Δ⊥‖/‖Δ‖."""
    lines = [f"{'module':<44} {'rows':>6} {'prot.rank':>9} {'residual':>10} {'kept norm':>10}"]
    for n, s in stats.items():
        if "residual" in s:
            lines.append(f"{n:<44} {s['rows']:>6} {s['protected_rank']:>9} {s['residual']:>10.3e} {s['kept_norm']:>10.4f}")
        else:
            lines.append(f"{n:<44} {'-':>6} {'-':>9} {'-':>10} {s.get('kept_norm', float('nan')):>10.4f}")
    res = [s["residual"] for s in stats.values() if "residual" in s]
    kept = [s["kept_norm"] for s in stats.values() if "kept_norm" in s]
    if kept:
        lines.append(f"{'overall':<44} {'':>6} {'':>9} {(max(res) if res else float('nan')):>10.3e} "
                     f"{sum(kept) / len(kept):>10.4f}   (max residual, mean kept norm)")
    return "\n".join(lines)


def build_adapter(
    lrm: str | Path | None = None,
    itm: str | Path | None = None,
    base: str | Path | None = None,
    out: str | Path | None = None,
    *,
    reasoning_calib: str | Path | list | None = None,
    instruction_calib: str | Path | list | None = None,
    method: str = "rain",
    preset: str | None = None,
    targets: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    skip_first_layers: int = 0,
    project_layers: Sequence[int] | None = None,
    radius: int = DEFAULT_RADIUS,
    projection: str = "hard",
    protect_energy: float = DEFAULT_PROTECT_ENERGY,
    ridge: float = DEFAULT_RIDGE,
    svd_dtype: str = "float32",
    max_samples: int | None = None,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    max_seq_len: int = 4096,
    batch_size: int = 1,
    dtype: str = "float32",
    device: str | None = None,
    no_stage2: bool = False,
    resume: bool = False,
    sequential: bool = False,
    storage: str = "dense",
    rank: int | None = None,
    rank_energy: float | None = None,
    max_rank: int | None = None,
    merge_bias: bool = False,
    overwrite: bool = False,
    density: float = DEFAULT_DENSITY,
    drop: float = DEFAULT_DROP,
    seed: int = 0,
    rho: float = 0.5,
    alpha_grad: str = "level",
    alpha_norm: str = "mean",
    alpha_max: float = 1.5,
    o_alpha: str = "mean",
    stage2_max_samples: int | None = None,
    stage2_max_seq_len: int | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> Path:
    """Build an adapter and return its directory. See the module docstring for the steps and
    ``rain build --help`` for the options. ``reasoning_calib=None`` uses the shared set."""
    t_start = time.perf_counter()
    # ---- 1. options --------------------------------------------------------------------------
    check_method(method)
    if preset is not None:
        p = get_preset(preset)
        lrm, itm, base = lrm or p.lrm, itm or p.itm, base or p.base
        if out is None:
            from ..format.paths import adapter_home
            out = adapter_home() / preset_output_name(preset)
    missing = [n for n, v in (("lrm", lrm), ("itm", itm), ("base", base), ("out", out)) if v is None]
    if missing:
        raise BuildError(f"missing {', '.join('--' + m for m in missing)} (or give --preset)")
    if projection not in PROJECTIONS:
        raise BuildError(f"--projection must be one of {list(PROJECTIONS)}, got {projection!r}")
    if not 0.0 <= protect_energy <= 1.0:
        raise BuildError(f"--protect-energy must be in [0, 1], got {protect_energy}")
    if projection == "ridge" and ridge <= 0:
        raise BuildError(f"--ridge must be > 0, got {ridge}")
    if storage not in ("dense", "lowrank"):
        raise BuildError(f"--storage must be dense or lowrank, got {storage!r}")
    if storage == "lowrank" and rank is None and rank_energy is None:
        raise BuildError("--storage lowrank needs --rank R or --rank-energy E")
    if storage == "dense" and (rank is not None or rank_energy is not None):
        raise BuildError("--rank / --rank-energy only apply with --storage lowrank")
    model_dtype = _dtype(dtype, "--dtype")
    compute_dtype = _dtype(svd_dtype, "--svd-dtype")
    out = Path(out).expanduser()
    partial = Path(str(out) + PARTIAL_SUFFIX)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    use_proj = needs_projection(method)

    def log(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr, flush=True)

    # ---- 2. tokenizer + calibration ----------------------------------------------------------
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(lrm))
    calib = None
    if use_proj:
        calib = prepare_reasoning_calibration(tokenizer, reasoning_calib, radius=radius, max_samples=max_samples,
                                              max_seq_len=max_seq_len, min_samples=min_samples)
        log(f"[rain build] calibration: {calib.info['n_samples']} samples, {calib.info['n_positions']} "
            f"thinking positions (skipped {calib.info['skipped']})")

    # ---- 3. LRM + targets --------------------------------------------------------------------
    from ..format.arch import module_layer, module_role, target_linears, validate_roles

    model = AutoModelForCausalLM.from_pretrained(str(lrm), dtype=model_dtype)
    model.eval()
    n_layers = int(model.config.num_hidden_layers)
    roles = validate_roles(targets) if targets else None
    layer_ids = list(layers) if layers is not None else list(range(n_layers))
    layer_ids = [i for i in layer_ids if i >= skip_first_layers]
    if not layer_ids:
        raise BuildError(f"no layers left to merge (layers={layers}, skip_first_layers={skip_first_layers})")
    modules = target_linears(model, roles, layer_ids)
    # Stage 1 on a subset of layers (None: all): the other layers keep the plain task vector
    proj_layers = set(layer_ids) if project_layers is None else {int(i) for i in project_layers}
    if project_layers is not None and use_proj:
        bad = sorted(proj_layers - set(range(n_layers)))
        if bad:
            raise BuildError(f"--project-layers: {bad} not in the model's layers 0-{n_layers - 1}")
    module_names = list(modules)
    from ..format.store import compute_fingerprint
    fingerprint = compute_fingerprint(model, module_names)  # the LRM's weights: fixed for the whole build
    run_s2 = method == "rain" and instruction_calib is not None and not no_stage2
    if device is not None and not sequential:
        model.to(device)

    # ---- 4. task-vector sources (headers only) ----------------------------------------------
    from .taskvector import CheckpointReader, check_task_vector, module_shapes, task_vector

    itm_r, base_r = CheckpointReader(itm, "ITM"), CheckpointReader(base, "base")
    shapes = module_shapes(modules)
    check_task_vector(itm_r, base_r, shapes, merge_bias=merge_bias)

    # ---- 5. per layer: features, Δ, projection ---------------------------------------------
    settings = {
        "lrm": str(lrm), "itm": str(itm), "base": str(base), "method": method, "modules": list(modules),
        "projection": projection if use_proj else None, "protect_energy": protect_energy, "ridge": ridge,
        "radius": radius, "svd_dtype": svd_dtype, "merge_bias": merge_bias, "density": density, "drop": drop,
        "seed": seed, "calib_hash": calib.info["calib_hash"] if calib else None, "dtype": dtype,
        "project_layers": sorted(proj_layers) if project_layers is not None else None,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    done: set[int] = set()
    if partial.exists():
        meta_f = partial / "meta.json"
        same = meta_f.is_file() and json.loads(meta_f.read_text()).get("key") == key
        if resume and same:
            done = {int(p.stem.split("_")[1]) for p in partial.glob("layer_*.safetensors")
                    if p.with_suffix(".json").is_file()}
            log(f"[rain build] resuming: {len(done)} layer(s) cached in {partial}")
        else:
            if resume:
                log(f"[rain build] {partial} was made with other settings; starting over")
            shutil.rmtree(partial)
    created_partial = not partial.exists()
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "meta.json").write_text(json.dumps({"key": key, "settings": settings}, indent=1))

    by_layer: dict[int, list[str]] = {}
    for n in modules:
        by_layer.setdefault(module_layer(n), []).append(n)
    todo = [l for l in sorted(by_layer) if l not in done]
    from tqdm.auto import tqdm

    def process_layer(l: int, feats: dict[str, torch.Tensor] | None) -> None:
        ld, ls = {}, {}
        for n in by_layer[l]:
            md = task_vector(itm_r, base_r, n, merge_bias=merge_bias)
            if use_proj and l not in proj_layers:
                dn = float(md.delta.norm())
                ld[n], ls[n] = md, {"projected": False, "kept_norm": 1.0 if dn > 0 else 0.0}
            elif use_proj:
                P, st = project(md.delta, feats[n], projection=projection, protect_energy=protect_energy,
                                ridge=ridge, dtype=compute_dtype, device=device,
                                generator=module_generator(seed, n))
                ld[n], ls[n] = ModuleDelta(delta=P, bias=md.bias), st.to_dict()
            else:
                td = transform(method, n, md, density=density, drop=drop, seed=seed)
                dn = float(md.delta.norm())
                ld[n], ls[n] = td, {"kept_norm": float(td.delta.norm()) / dn if dn > 0 else 0.0}
        _save_layer(partial / f"layer_{l}.safetensors", ld, ls)

    def run_layers() -> None:
        if not todo:
            return
        feat_todo = [l for l in todo if use_proj and l in proj_layers]
        for l in tqdm([l for l in todo if l not in feat_todo], desc=f"{method} (layers)",
                      disable=not progress or len(feat_todo) == len(todo)):
            process_layer(l, None)  # no features needed: plain Δ or a baseline transform
            trim_heap()
        if feat_todo:
            from .features import iter_layer_features
            todo_mods = {n: modules[n] for l in feat_todo for n in by_layer[l]}
            it = iter_layer_features(model, todo_mods, calib, sequential=sequential, batch_size=batch_size,
                                     device=device, pad_id=tokenizer.pad_token_id, progress=progress)
            for l, feats in tqdm(it, total=len(feat_todo), desc="stage 1 (layers)", disable=not progress):
                process_layer(l, feats)
                del feats
                trim_heap()

    try:
        with torch.inference_mode():
            run_layers()
    except BaseException:
        if created_partial and not any(partial.glob("layer_*.safetensors")):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if not run_s2:
        # the LRM is not needed any more (fingerprint taken above): free it before the adapter is
        # assembled, so the peak is max(LRM + one layer's work, adapter) rather than their sum
        del model, modules
        gc.collect()
        trim_heap()

    deltas: dict[str, ModuleDelta] = {}
    stats: dict[str, dict] = {}
    for l in sorted(by_layer):
        d, s = _load_layer(partial / f"layer_{l}.safetensors")
        deltas.update(d)
        stats.update(s)
    deltas = {n: deltas[n] for n in module_names}
    stats = {n: stats[n] for n in module_names}
    t_stage1 = time.perf_counter() - t_start
    if verbose:
        print(format_stats_table(stats), flush=True)

    # ---- 6. Stage 2 --------------------------------------------------------------------------
    stage2: dict[str, Any] = {}
    final_method = method
    if method == "rain":
        if run_s2:
            try:
                from .coefficients import run_stage2
            except ImportError as e:
                raise NotImplementedError(f"Stage 2 is not available ({e}); use --no-stage2") from e
            if sequential and device is not None:
                model.to(device)
            # Stage 2 samples hold the whole response, so they may need their own limits.
            deltas, stage2 = run_stage2(
                model, tokenizer, deltas, instruction_calib, rho=rho, alpha_grad=alpha_grad,
                alpha_norm=alpha_norm, alpha_max=alpha_max, o_alpha=o_alpha,
                max_samples=max_samples if stage2_max_samples is None else stage2_max_samples,
                max_seq_len=max_seq_len if stage2_max_seq_len is None else stage2_max_seq_len,
                device=device, progress=progress)
        else:
            final_method = "rain-stage1"
            stage2 = {"applied": False,
                      "reason": "--no-stage2" if no_stage2 else "no --instruction-calib given", "alpha": 1.0}
    t_stage2 = time.perf_counter() - t_start - t_stage1

    # ---- 7. low-rank -------------------------------------------------------------------------
    fidelity: dict[str, Any] = {}
    rank_field: Any = None
    if storage == "lowrank":
        from .lowrank import compress, rank_field as _rank_field
        deltas, fidelity = compress(deltas, rank=rank, rank_energy=rank_energy, max_rank=max_rank,
                                    device=device, progress=progress)
        rank_field = _rank_field(fidelity)

    # ---- 8. config + atomic write ------------------------------------------------------------
    from ..format.config import RainConfig
    from ..format.store import save_adapter

    stage1 = {
        "method": method,
        "projection": projection if use_proj else None,
        "protect_energy": protect_energy if use_proj and projection in ("hard", "random") else None,
        "ridge": ridge if use_proj and projection == "ridge" else None,
        "rtol": "max(n, in)*eps(svd_dtype)",
        "svd_dtype": svd_dtype,
        "radius": radius,
        "sequential": sequential,
        "merge_bias": merge_bias,
        "modules": stats,
    }
    if calib is not None:
        stage1.update({k: calib.info[k] for k in ("calib_path", "calib_hash", "n_samples", "n_positions", "skipped",
                                                   "max_seq_len")})
    if method in ("ties", "dare-ties"):
        stage1["density"] = density
    if method == "dare-ties":
        stage1.update({"drop": drop, "seed": seed})
    if use_proj and projection == "random":
        stage1["seed"] = seed
    if use_proj and project_layers is not None:
        stage1["project_layers"] = sorted(proj_layers & set(layer_ids))
    used_roles = list(dict.fromkeys(module_role(n) for n in module_names))
    config = RainConfig(
        base_model_name_or_path=str(lrm), itm_name_or_path=str(itm), itm_base_name_or_path=str(base),
        target_modules=used_roles, layers=sorted(by_layer), storage=storage, rank=rank_field,
        dtype="float32", method=final_method, stage1=stage1, stage2=stage2, fidelity=fidelity,
        fingerprint=fingerprint,
        extra={"build_seconds": {"stage1": round(t_stage1, 3), "stage2": round(t_stage2, 3),
                                 "total": round(time.perf_counter() - t_start, 3)}},
    )
    save_adapter(deltas, config, out, overwrite=overwrite)
    shutil.rmtree(partial, ignore_errors=True)
    log(f"[rain build] wrote {out} ({final_method}, {len(deltas)} modules, {storage}) "
        f"in {time.perf_counter() - t_start:.1f} s")
    return out


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _int_list(s: str) -> list[int]:
    out: list[int] = []
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def _str_list(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def add_parser(subparsers) -> None:
    """Register ``rain build``."""
    p = subparsers.add_parser(
        "build", help="build a RAIN adapter from an LRM, an ITM and the ITM's base",
        description="Stream the ITM−base task vector, project it away from the LRM's inputs at the thinking "
                    "positions (Stage 1), optionally compute per-head coefficients (Stage 2), write the adapter.")
    g = p.add_argument_group("models")
    g.add_argument("--lrm", help="reasoning model (dir or Hub id)")
    g.add_argument("--itm", help="instruction-tuned model (dir or Hub id)")
    g.add_argument("--base", help="the ITM's base model (dir or Hub id)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="fill --lrm/--itm/--base and name the output rain-<preset>")
    g.add_argument("--out", help="output adapter directory (default with --preset: <adapter home>/rain-<preset>)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    g.add_argument("--resume", action="store_true", help="continue from <out>.partial if its settings match")
    g = p.add_argument_group("scope")
    g.add_argument("--method", default="rain", choices=METHODS)
    g.add_argument("--targets", type=_str_list, default=None, help="roles, e.g. q,k,v,o,gate,up,down (default all)")
    g.add_argument("--layers", type=_int_list, default=None, help="layer ids, e.g. 0-3,8 (default all)")
    g.add_argument("--skip-first-layers", type=int, default=0, help="do not merge the first N layers")
    g.add_argument("--merge-bias", action="store_true", help="also store the ITM's bias deltas")
    g = p.add_argument_group("stage 1")
    g.add_argument("--reasoning-calib", default=None, help="JSON/JSONL {prompt, reasoning, response} (default: shared set)")
    g.add_argument("--radius", type=int, default=DEFAULT_RADIUS, help="inner neighbours of <think>/</think> (default 5)")
    g.add_argument("--projection", default="hard", choices=PROJECTIONS,
                   help="hard (default), ridge, none, or random: a control that removes as many "
                        "input directions as hard, drawn at random (seeded by --seed)")
    g.add_argument("--project-layers", type=_int_list, default=None,
                   help="project only these layers, e.g. 0-13 (default all; the others keep the plain "
                        "task vector; in the toy world the first half did best, bench/RESULTS.md)")
    g.add_argument("--protect-energy", type=float, default=DEFAULT_PROTECT_ENERGY,
                   help=f"hard: fraction of feature energy protected (default {DEFAULT_PROTECT_ENERGY}; 1.0 = exact)")
    g.add_argument("--ridge", type=float, default=DEFAULT_RIDGE, help=f"ridge: rho / mean(s^2) (default {DEFAULT_RIDGE})")
    g.add_argument("--svd-dtype", default="float32", choices=["float32", "float64"])
    g.add_argument("--max-samples", type=int, default=None)
    g.add_argument("--min-samples", type=int, default=DEFAULT_MIN_SAMPLES)
    g.add_argument("--max-seq-len", type=int, default=4096)
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--sequential", action="store_true", help="layer-by-layer feature capture (model larger than device)")
    g.add_argument("--density", type=float, default=DEFAULT_DENSITY, help="ties / dare-ties: fraction of entries kept")
    g.add_argument("--drop", type=float, default=DEFAULT_DROP, help="dare-ties: drop probability")
    g.add_argument("--seed", type=int, default=0, help="dare-ties drops, --projection random's subspaces")
    g = p.add_argument_group("stage 2")
    g.add_argument("--instruction-calib", default=None, help="instruction calibration JSONL (runs Stage 2)")
    g.add_argument("--no-stage2", action="store_true")
    g.add_argument("--rho", type=float, default=0.5)
    g.add_argument("--alpha-grad", default="level", choices=["level", "gain"])
    g.add_argument("--alpha-norm", default="mean", choices=["mean", "none"])
    g.add_argument("--alpha-max", type=float, default=1.5)
    g.add_argument("--o-alpha", default="mean", choices=["mean", "head"],
                   help="o_proj: layer-mean α (default; keeps the Stage 1 constraint) or per-head input columns")
    g.add_argument("--stage2-max-samples", type=int, default=None, help="default: --max-samples")
    g.add_argument("--stage2-max-seq-len", type=int, default=None, help="default: --max-seq-len")
    g = p.add_argument_group("storage and compute")
    g.add_argument("--storage", default="dense", choices=["dense", "lowrank"])
    g.add_argument("--rank", type=int, default=None)
    g.add_argument("--rank-energy", type=float, default=None)
    g.add_argument("--max-rank", type=int, default=None)
    g.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="LRM dtype for the forward passes")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: where the model loads)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    build_adapter(
        args.lrm, args.itm, args.base, args.out, reasoning_calib=args.reasoning_calib,
        instruction_calib=args.instruction_calib, method=args.method, preset=args.preset, targets=args.targets,
        layers=args.layers, skip_first_layers=args.skip_first_layers, project_layers=args.project_layers,
        radius=args.radius,
        projection=args.projection, protect_energy=args.protect_energy, ridge=args.ridge, svd_dtype=args.svd_dtype,
        max_samples=args.max_samples, min_samples=args.min_samples, max_seq_len=args.max_seq_len,
        batch_size=args.batch_size, dtype=args.dtype, device=args.device, no_stage2=args.no_stage2,
        resume=args.resume, sequential=args.sequential, storage=args.storage, rank=args.rank,
        rank_energy=args.rank_energy, max_rank=args.max_rank, merge_bias=args.merge_bias, overwrite=args.overwrite,
        density=args.density, drop=args.drop, seed=args.seed, rho=args.rho, alpha_grad=args.alpha_grad,
        alpha_norm=args.alpha_norm, alpha_max=args.alpha_max, o_alpha=args.o_alpha,
        stage2_max_samples=args.stage2_max_samples, stage2_max_seq_len=args.stage2_max_seq_len,
        progress=not args.no_progress,
    )
    return 0


add_build_parser = add_parser
