"""``build_adapter``: LRM + ITM + base + calibration → adapter directory (docs/DESIGN.md §5, §6).

``build_adapter`` runs these named steps (each fails with a clear message before anything is written):

1. :func:`resolve_options`: BuildOptions validated (``options``), ``--preset`` applied; with
   ``--threads N`` the rest runs under ``torch.set_num_threads(N)`` (:func:`torch_threads`, the
   previous setting restored after); :func:`output_dir` refuses an existing output (unless
   ``--overwrite``);
2. before any weight is loaded (``preflight``, seconds even for 32B models): the three configs
   compared (``preflight.check_configs``: structural differences fail, others warn); then
   :func:`load_calibration`: tokenizer + reasoning calibration → token ids and thinking positions Ω
   (``calibration``; only for methods that project), every sample round-tripped through the
   tokenizer with ids below the LRM's ``vocab_size``; when Stage 2 will run, the instruction set
   prepared and checked as Stage 2 will (``preflight.check_instruction_calibration``); the ITM /
   base shard headers against the LRM's module names and shapes from a ``meta``-device skeleton of
   its config (``preflight.check_checkpoints``). A Hub id that cannot be fetched is one line
   (``hub.fetching``);
3. ``targets.load_lrm``: the LRM once (``AutoModelForCausalLM``, ``dtype=``), its targeted linears
   (``arch``); a method that runs no LRM forward (no projection, no Stage 2:
   ``targets.needs_lrm_weights``) loads no LRM weights at all: the targets come from step 2's
   skeleton and the fingerprint from the sampled rows of the LRM's safetensors
   (``targets.skeleton_targets``);
4. :func:`check_sources`: the same header check against the loaded modules, when no skeleton
   could be built for step 2;
5. :func:`run_stage1`: per layer, features X at Ω (``features``; one pass or ``--sequential``), then
   per module the streamed Δ_I (``taskvector``) → Stage 1 projection (``nullspace.project``) or the
   method's transform (``methods``); each finished layer goes to ``<out>.partial/`` (``cache``);
   with ``--feature-cache`` the features come from / go to ``feature_cache`` (a full hit runs no
   forward); then :func:`check_kept_norm` warns loudly when Stage 1 left (almost) nothing of Δ;
6. :func:`apply_stage2`: Stage 2 (``coefficients.run_stage2``) when the method has it and an
   instruction calibration set is given; with ``--feature-cache`` its attention statistics come
   from / go to the cache (``feature_cache.Stage2StatsCache``: a hit runs no attention pass);
7. :func:`compress_storage`: ``--storage lowrank`` → ``lowrank.compress``;
8. :func:`make_config` + atomic ``store.save_adapter``; the partial cache is removed.

What a method does (projection, Stage 2, its transform, what it records) is declared in
``methods.REGISTRY``; the options and their checks are ``options.BuildOptions``; the CLI is
``rain_adapter.cli.build``.

Memory: the LRM once (its safetensors are memory-mapped: the weights count as file-backed,
reclaimable RSS, not as anonymous memory), one layer's forward work and features, one module's Δ
at a time. Finished layers go to the partial cache and leave memory; at the end they are
memory-mapped back (file-backed again) and streamed into the final write. Without Stage 2 the LRM
is released before that, so the peak is max(LRM + one layer's work, adapter), not their sum.
Measured on a 97.6M-parameter Qwen2 (bench/build_bench.py, bench/RESULTS.md). A method that runs
no LRM forward never holds the LRM: its peak is the adapter.

``project`` and ``prepare_reasoning_calibration`` are called through this module's globals (and
``features`` / ``taskvector`` / ``cache`` / ``store`` functions through their modules) so tests and
bench/build_bench.py can patch or time them here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..format import store
from ..format.arch import module_role
from ..format.config import RainConfig
from ..format.delta import ModuleDelta
from ..format.tokenizer import load_tokenizer
from . import cache as layer_cache
from . import features, preflight, taskvector
from .dispatch import (check_available, format_device_map, map_source, onloaded, parse_device_map,
                       parse_max_memory, resolve_device_map)
from .cache import PARTIAL_SUFFIX, PartialCache
from .calibration import CalibrationSet, prepare_reasoning_calibration
from .coefficients import run_stage2
from .errors import KeptNormWarning
from .feature_cache import FeatureCache, Stage2StatsCache, feature_settings, stage2_settings
from .features import trim_heap
from .lowrank import compress, rank_field
from .methods import MergeMethod, get_method, module_generator
from .hub import fetching
from .nullspace import ENERGY_PROJECTIONS, project
from .options import MODEL_FIELDS, BuildError, BuildOptions
from .report import (BuildLog, calibration_line, done_line, format_stats_table, kept_norm_check,
                     stage1_skipped_line)
from .targets import Targets, load_lrm, needs_lrm_weights, wants_stage2
from .threads import torch_threads

__all__ = ["PARTIAL_SUFFIX", "BuildError", "BuildOptions", "build_adapter", "format_stats_table"]

Sources = tuple[taskvector.CheckpointReader, taskvector.CheckpointReader]  # (ITM, base)


# ---- 1. options ------------------------------------------------------------------------------
def resolve_options(lrm: Any, itm: Any, base: Any, out: Any, options: BuildOptions | None,
                    overrides: dict[str, Any]) -> BuildOptions:
    """``options`` (default: all defaults) with the given models / keywords laid over it,
    validated, ``--preset`` applied. An unknown keyword is a TypeError, as for any function."""
    given = {k: v for k, v in zip(MODEL_FIELDS, (lrm, itm, base, out)) if v is not None}
    opts = replace(options or BuildOptions(), **overrides, **given)
    opts.validate()
    return opts.resolved()


def output_dir(opts: BuildOptions) -> Path:
    """The output directory, vetted before any model is loaded: an existing one is refused unless
    ``overwrite``, and even then unless it is an adapter directory or empty (``--out ~
    --overwrite`` must not wipe a home directory); an ``<out>.partial`` this library did not create
    is refused (never deleted); an output that could not be created is a PermissionError now
    rather than after the LRM forwards."""
    out = Path(opts.out).expanduser()
    if out.exists() and not opts.overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    store.check_replaceable(out)
    layer_cache.check_partial(out)
    store.check_writable(out)
    return out


# ---- 2.-4. inputs ----------------------------------------------------------------------------
def load_calibration(opts: BuildOptions, method: MergeMethod, log: BuildLog, vocab_size: int | None = None
                     ) -> tuple[Any, CalibrationSet | None]:
    """The LRM's tokenizer, and (for projecting methods) the reasoning calibration set, every
    sample round-tripped through the tokenizer (ids below ``vocab_size``, the LRM's config)."""
    with fetching(opts.lrm, "lrm"):
        tokenizer = load_tokenizer(opts.lrm)
    if not method.projects:
        return tokenizer, None
    calib = prepare_reasoning_calibration(tokenizer, opts.reasoning_calib, radius=opts.radius,
                                          max_samples=opts.max_samples, max_seq_len=opts.max_seq_len,
                                          min_samples=opts.min_samples, vocab_size=vocab_size)
    log(calibration_line(calib.info))
    return tokenizer, calib


def check_sources(opts: BuildOptions, modules: dict[str, nn.Linear], sources: Sources | None = None) -> Sources:
    """Check every targeted module of the loaded LRM against the ITM's and base's shapes
    (safetensors headers only; nothing is read yet); opens the checkpoints unless ``sources``."""
    itm_r, base_r = sources or (taskvector.CheckpointReader(opts.itm, "ITM"),
                                taskvector.CheckpointReader(opts.base, "base"))
    taskvector.check_task_vector(itm_r, base_r, taskvector.module_shapes(modules), merge_bias=opts.merge_bias)
    return itm_r, base_r


def cache_settings(opts: BuildOptions, method: MergeMethod, targets: Targets,
                   calib: CalibrationSet | None) -> dict[str, Any]:
    """Everything the cached layers depend on (a partial cache made with other settings is not reused);
    not ``feature_cache``, which changes where the features come from, never the result."""
    return {
        "lrm": str(opts.lrm), "itm": str(opts.itm), "base": str(opts.base), "method": method.name,
        "modules": list(targets.modules), "projection": opts.projection if method.projects else None,
        "protect_energy": opts.protect_energy, "ridge": opts.ridge, "radius": opts.radius,
        "svd_dtype": opts.svd_dtype, "merge_bias": opts.merge_bias, "density": opts.density, "drop": opts.drop,
        "seed": opts.seed, "calib_hash": calib.info["calib_hash"] if calib else None, "dtype": opts.dtype,
        "project_layers": sorted(targets.proj_layers) if opts.project_layers is not None else None,
        # the LRM's weights, not only its path (a checkpoint rewritten in place is another build)
        "lrm_fingerprint": layer_cache.settings_key(getattr(targets, "fingerprint", None) or {}),
    }


def dispatch_map(opts: BuildOptions, method: MergeMethod, skeleton: nn.Module | None, log: BuildLog
                 ) -> dict[str, Any] | None:
    """``--device-map`` resolved on the pre-flight's skeleton, before any weight is loaded
    (``dispatch.resolve_device_map``; an unknown module, an uncovered weight or a GPU this machine
    lacks is a BuildError naming it); None without ``--device-map`` or when the build runs no LRM
    forward (then no weights are loaded at all)."""
    if opts.device_map is None:
        return None
    if not needs_lrm_weights(opts, method):
        log(f"[rain build] --device-map unused: {method.name} runs no LRM forward (its weights are not loaded)")
        return None
    if skeleton is None:
        raise BuildError("--device-map: the LRM's config could not be built on the meta device, so no device "
                         "map can be resolved for it", field="device_map")
    where = map_source(opts.device_map)
    dm = resolve_device_map(parse_device_map(opts.device_map), skeleton, dtype=opts.model_dtype,
                            max_memory=parse_max_memory(opts.max_memory), where=where)
    check_available(dm, where)
    log("[rain build] device map (accelerate):\n" + format_device_map(dm))
    return dm


# ---- 5. Stage 1, one layer at a time ---------------------------------------------------------
@dataclass
class LayerWork:
    """Turns one layer's task vectors into stored deltas: D = P(Δ) (Stage 1) or the method's T(Δ)."""

    opts: BuildOptions
    method: MergeMethod
    sources: Sources
    proj_layers: set[int]
    cache: PartialCache

    def module(self, name: str, layer: int, feats: dict[str, torch.Tensor] | None) -> tuple[ModuleDelta, dict]:
        """(D, stats) for one module; ``feats[name]``: X [rows, in] at the thinking positions. Every
        stats dict carries ``task_norm`` = ‖Δ‖_F (what plain task arithmetic would store)."""
        o = self.opts
        md = taskvector.task_vector(*self.sources, name, merge_bias=o.merge_bias)
        dn = float(md.delta.norm())
        if self.method.projects and layer not in self.proj_layers:
            return md, {"projected": False, "kept_norm": 1.0 if dn > 0 else 0.0, "task_norm": dn}
        if self.method.projects:
            P, st = project(md.delta, feats[name], projection=o.projection, protect_energy=o.protect_energy,
                            ridge=o.ridge, dtype=o.compute_dtype, device=o.device,
                            generator=module_generator(o.seed, name))
            return ModuleDelta(delta=P, bias=md.bias), {**st.to_dict(), "task_norm": dn}
        td = self.method.apply(name, md, vars(o))
        return td, {"kept_norm": float(td.delta.norm()) / dn if dn > 0 else 0.0, "task_norm": dn}

    def layer(self, layer: int, names: list[str], feats: dict[str, torch.Tensor] | None) -> None:
        """All modules of ``layer`` → one cached layer file."""
        done = {n: self.module(n, layer, feats) for n in names}
        self.cache.save_layer(layer, {n: d for n, (d, _) in done.items()}, {n: s for n, (_, s) in done.items()})


def stage1_features(o: BuildOptions, targets: Targets, feat_todo: list[int], calib: CalibrationSet,
                    pad_id: int | None, log: BuildLog | None = None):
    """``(layer, {module: X})`` for every layer of ``feat_todo``: from the LRM forward
    (``features.iter_layer_features``), or with ``--feature-cache`` from the cache where it holds
    them (the forward then runs only for the layers it lacks, and they are saved)."""
    def compute(layers: list[int]):
        mods = {n: targets.modules[n] for l in layers for n in targets.by_layer[l]}
        return features.iter_layer_features(targets.model, mods, calib, sequential=o.sequential,
                                            batch_size=o.batch_size, device=o.device, pad_id=pad_id,
                                            progress=o.progress)

    if o.feature_cache is None:
        return compute(feat_todo)
    with onloaded(_embedding(targets.model)):  # its fingerprint keys the cache; offloaded: loaded for it
        settings = feature_settings(o, calib, targets.model)
    fc = FeatureCache(o.feature_cache, settings, warn=log.warn if log else None)
    return fc.layers(feat_todo, targets.by_layer, targets.fingerprint, compute, log or (lambda msg: None))


def _embedding(model: nn.Module | None) -> nn.Module | None:
    return model.get_input_embeddings() if model is not None else None


def run_stage1(work: LayerWork, targets: Targets, todo: list[int], calib: CalibrationSet | None,
               pad_id: int | None, log: BuildLog | None = None) -> None:
    """Every layer in ``todo`` through ``work``: first those that need no features (plain Δ or a
    transform), then the projected ones as the features arrive, layer by layer."""
    o = work.opts
    feat_todo = [l for l in todo if work.method.projects and l in targets.proj_layers]
    for l in tqdm([l for l in todo if l not in feat_todo], desc=f"{work.method.name} (layers)",
                  disable=not o.progress or len(feat_todo) == len(todo)):
        work.layer(l, targets.by_layer[l], None)
        trim_heap()
    if not feat_todo:
        return
    it = stage1_features(o, targets, feat_todo, calib, pad_id, log)
    for l, feats in tqdm(it, total=len(feat_todo), desc="stage 1 (layers)", disable=not o.progress):
        work.layer(l, targets.by_layer[l], feats)
        del feats
        trim_heap()


def assemble(cache: PartialCache, targets: Targets) -> tuple[dict[str, ModuleDelta], dict[str, dict]]:
    """Every cached layer memory-mapped back, in the targets' module order."""
    deltas: dict[str, ModuleDelta] = {}
    stats: dict[str, dict] = {}
    for l in sorted(targets.by_layer):
        d, s = layer_cache.load_layer(cache.layer_path(l))
        deltas.update(d)
        stats.update(s)
    return {n: deltas[n] for n in targets.names}, {n: stats[n] for n in targets.names}


# ---- 6.-7. Stage 2, storage ------------------------------------------------------------------
def stage2_stats_cache(opts: BuildOptions, method: MergeMethod, targets: Targets, calib: CalibrationSet | None,
                       tokenizer: Any, deltas: dict[str, ModuleDelta], limits: tuple[int | None, int],
                       log: BuildLog | None = None) -> Stage2StatsCache | None:
    """With ``--feature-cache``: where Stage 2's attention statistics are kept, next to the features
    (keyed on ``feature_cache.stage2_settings``: the resume key, the features' key, the instruction set,
    ...; not ρ / α_max / alpha_norm / o_alpha). None without the cache or a reasoning calibration set."""
    if opts.feature_cache is None or calib is None:
        return None
    with onloaded(_embedding(targets.model)):
        fsettings = feature_settings(opts, calib, targets.model)
    fc = FeatureCache(opts.feature_cache, fsettings, warn=log.warn if log else None)
    settings = stage2_settings(opts, cache_settings(opts, method, targets, calib), fc.key, tokenizer, deltas, limits)
    return Stage2StatsCache(fc, settings, log)


def apply_stage2(opts: BuildOptions, method: MergeMethod, targets: Targets, tokenizer: Any,
                 deltas: dict[str, ModuleDelta], calib: CalibrationSet | None = None, log: BuildLog | None = None
                 ) -> tuple[dict[str, ModuleDelta], dict[str, Any], str]:
    """(deltas with α folded in, ``config.stage2``, the method name to record)."""
    if not method.stage2:
        return deltas, {}, method.name
    if not wants_stage2(opts, method):
        reason = "--no-stage2" if opts.no_stage2 else "no --instruction-calib given"
        return deltas, {"applied": False, "reason": reason, "alpha": 1.0}, method.without_stage2 or method.name
    if opts.sequential and opts.device is not None:
        targets.model.to(opts.device)
    device = targets.input_device or opts.device  # a dispatched LRM: ids to its embedding's device
    # Stage 2 samples hold the whole response, so they may need their own limits.
    limits = (opts.max_samples if opts.stage2_max_samples is None else opts.stage2_max_samples,
              opts.max_seq_len if opts.stage2_max_seq_len is None else opts.stage2_max_seq_len)
    deltas, stage2 = run_stage2(
        targets.model, tokenizer, deltas, opts.instruction_calib, rho=opts.rho, alpha_grad=opts.alpha_grad,
        alpha_norm=opts.alpha_norm, alpha_max=opts.alpha_max, o_alpha=opts.o_alpha, max_samples=limits[0],
        max_seq_len=limits[1], device=device, progress=opts.progress,
        stats_cache=stage2_stats_cache(opts, method, targets, calib, tokenizer, deltas, limits, log))
    return deltas, stage2, method.name


def compress_storage(opts: BuildOptions, deltas: dict[str, ModuleDelta]
                     ) -> tuple[dict[str, ModuleDelta], dict[str, Any], Any]:
    """``--storage lowrank``: truncated SVD per module → (deltas, fidelity, config rank); dense: as is."""
    if opts.storage != "lowrank":
        return deltas, {}, None
    deltas, fidelity = compress(deltas, rank=opts.rank, rank_energy=opts.rank_energy, max_rank=opts.max_rank,
                                device=opts.device, progress=opts.progress)
    return deltas, fidelity, rank_field(fidelity)


# ---- 8. config -------------------------------------------------------------------------------
def check_kept_norm(opts: BuildOptions, method: MergeMethod, stats: dict[str, dict],
                    calib: CalibrationSet | None, log: BuildLog) -> dict[str, Any]:
    """After Stage 1: the overall kept norm sqrt(Σ‖Δ⊥‖²)/sqrt(Σ‖Δ‖²), and a loud warning
    (:class:`KeptNormWarning`, printed even without ``verbose``) when it, or more than half of the
    projected modules, is (near) zero. Returns what ``config.stage1`` records of it."""
    hint = ""
    if method.projects:
        energy = f"--protect-energy {opts.protect_energy}, " if opts.projection in ENERGY_PROJECTIONS else ""
        rows = f"{calib.n_positions} calibration rows" if calib is not None else "the calibration rows"
        hint = f"--projection {opts.projection}, {energy}{rows}"
    total, msg = kept_norm_check(stats, hint)
    if msg:
        log.warn(msg, KeptNormWarning)
    return {"kept_norm_total": total, "warnings": [msg] if msg else []}


def stage1_record(opts: BuildOptions, method: MergeMethod, targets: Targets, stats: dict[str, dict],
                  calib: CalibrationSet | None, checks: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config.stage1``: the common settings, the calibration, and what the method declares —
    a transform method's ``params``; for projection, the options of the chosen projection;
    ``checks``: what :func:`check_kept_norm` found."""
    proj = method.projects
    rec: dict[str, Any] = {
        "method": method.name,
        "projection": opts.projection if proj else None,
        "protect_energy": opts.protect_energy if proj and opts.projection in ENERGY_PROJECTIONS else None,
        "ridge": opts.ridge if proj and opts.projection == "ridge" else None,
        "rtol": "max(n, in)*eps(svd_dtype)",
        "svd_dtype": opts.svd_dtype, "radius": opts.radius, "sequential": opts.sequential,
        "merge_bias": opts.merge_bias, "modules": stats, **(checks or {}),
    }
    if calib is not None:
        rec.update({k: calib.info[k] for k in ("calib_path", "calib_hash", "n_samples", "n_positions", "skipped",
                                               "max_seq_len")})
    if not proj:
        rec.update({p: getattr(opts, p) for p in method.params})
    else:
        if opts.projection == "random":
            rec["seed"] = opts.seed
        if opts.project_layers is not None:
            rec["project_layers"] = sorted(targets.proj_layers & set(targets.layer_ids))
    return rec


def make_config(opts: BuildOptions, targets: Targets, *, method_name: str, stage1: dict, stage2: dict,
                fidelity: dict, rank: Any, log: BuildLog) -> RainConfig:
    """The adapter's config; ``extra`` records the build options, timings and the build's warnings."""
    return RainConfig(
        base_model_name_or_path=str(opts.lrm), itm_name_or_path=str(opts.itm), itm_base_name_or_path=str(opts.base),
        target_modules=list(dict.fromkeys(module_role(n) for n in targets.names)),
        layers=sorted(targets.by_layer), storage=opts.storage, rank=rank, dtype="float32", method=method_name,
        stage1=stage1, stage2=stage2, fidelity=fidelity, fingerprint=targets.fingerprint,
        extra={"build_seconds": log.seconds(), "build_options": opts.to_dict(),
               **({"warnings": list(log.warnings)} if log.warnings else {})},
    )


# ---- the whole build -------------------------------------------------------------------------
def build_adapter(lrm: str | Path | None = None, itm: str | Path | None = None, base: str | Path | None = None,
                  out: str | Path | None = None, *, options: BuildOptions | None = None, **kwargs: Any) -> Path:
    """Build an adapter and return its directory. ``kwargs``: BuildOptions fields (``rain build
    --help``), laid over ``options``; see the module docstring for the steps. The build's clock
    (:class:`~rain_adapter.merging.report.BuildLog`) starts here, before anything else, so the
    time of the final ``wrote ...`` line is the whole call: preflight and loading included."""
    t_start = BuildLog.now()
    opts = resolve_options(lrm, itm, base, out, options, kwargs)
    if opts.dry_run:
        raise BuildError("dry_run: build_adapter always builds; rain build --dry-run (or "
                         "rain_adapter.cli.build.dry_run(options)) prints the plan instead", field="dry_run")
    with torch_threads(opts.threads):
        return _build(opts, t_start)


def _build(opts: BuildOptions, t_start: float) -> Path:
    """The steps of :func:`build_adapter` after the options are resolved."""
    out_dir, method, log = output_dir(opts), get_method(opts.method), BuildLog(opts.verbose, t_start=t_start)
    configs = preflight.check_configs(opts, log)
    tokenizer, calib = load_calibration(opts, method, log, configs.vocab_size)
    if wants_stage2(opts, method):
        preflight.check_instruction_calibration(opts, tokenizer, configs.vocab_size, log)
    sources, skeleton = preflight.check_checkpoints(opts, method, configs, log)
    device_map = dispatch_map(opts, method, skeleton, log)
    log.mark("preflight")
    targets = load_lrm(opts, method, skeleton, log, device_map)
    if skeleton is None:  # the skeleton is the loaded model's twin: check once, here only without it
        sources = check_sources(opts, targets.modules, sources)
    del skeleton
    log.mark("load")
    cache = PartialCache(out_dir)
    done = cache.open(cache_settings(opts, method, targets, calib), resume=opts.resume, log=log)
    try:
        with torch.inference_mode():
            run_stage1(LayerWork(opts, method, sources, targets.proj_layers, cache), targets,
                       [l for l in sorted(targets.by_layer) if l not in done], calib, tokenizer.pad_token_id,
                       log)
    except BaseException:
        cache.discard_if_empty()
        raise
    if not wants_stage2(opts, method):
        # the LRM is not needed any more (fingerprint taken): free it before the adapter is
        # assembled, so the peak is max(LRM + one layer's work, adapter) rather than their sum
        targets.release()
    deltas, stats = assemble(cache, targets)
    log.mark("stage1")
    if method.projects:
        log.table(stats)
    else:
        log(stage1_skipped_line(method.name, stats))
    checks = check_kept_norm(opts, method, stats, calib, log)
    deltas, stage2, method_name = apply_stage2(opts, method, targets, tokenizer, deltas, calib, log)
    log.mark("stage2")
    deltas, fidelity, rank = compress_storage(opts, deltas)
    config = make_config(opts, targets, method_name=method_name, stage1=stage1_record(opts, method, targets, stats,
                         calib, checks), stage2=stage2, fidelity=fidelity, rank=rank, log=log)
    store.save_adapter(deltas, config, out_dir, overwrite=opts.overwrite)
    cache.remove()
    log.mark("write")
    log(done_line(out_dir, method_name, len(deltas), opts.storage, log.elapsed(), log.marks))
    return out_dir
