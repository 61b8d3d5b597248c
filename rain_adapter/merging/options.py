"""Every option of ``rain build`` as data: one :class:`BuildOptions` dataclass.

Each field carries ``metadata`` that the CLI (``rain_adapter.cli.build``) turns into a flag
(``--`` + name with ``_`` → ``-``): ``help``, ``group`` (one of :data:`GROUPS`), ``choices`` where the
value is one of a few names, and ``parse`` (str → value) for non-bool fields, e.g.
:func:`parse_int_list` for ``--layers 0-3,8``. Bool fields are switches: ``--name`` when the
default is False, ``--no-name`` when it is True.

:meth:`BuildOptions.validate` makes every check that needs no model (so a bad option fails before
anything is loaded or written) and raises :class:`BuildError` naming the field;
:meth:`BuildOptions.to_dict` is the JSON-safe record the adapter config keeps under
``extra["build_options"]``: every field but those that say how the build runs, not what it
computes (``threads``, ``device_map``, ``max_memory``, ``offload_folder``, ``dry_run``,
``plan_profile``): how many CPU threads ran the build, or where accelerate put the LRM's layers,
cannot change the adapter (tests/test_build_dispatch.py), so they are not recorded and two builds
differing only in them record the same options.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from ..format.arch import validate_roles
from ..format.dtypes import DTYPES
from ..format.paths import adapter_home
from .calibration import DEFAULT_MIN_SAMPLES, DEFAULT_RADIUS
from .coefficients import DEFAULT_RHO
from .errors import BuildError
from .methods import DEFAULT_DENSITY, DEFAULT_DROP, get_method, method_names
from .nullspace import DEFAULT_PROTECT_ENERGY, DEFAULT_RIDGE, PROJECTIONS
from .plan_data import PROFILES
from .presets import PRESETS, get_preset, preset_output_name

#: CLI argument groups, in ``rain build --help`` order.
GROUPS = ("models", "scope", "stage 1", "stage 2", "storage and compute")
STORAGES = ("dense", "lowrank")
MODEL_FIELDS = ("lrm", "itm", "base", "out")


__all__ = ["GROUPS", "STORAGES", "MODEL_FIELDS", "BuildError", "BuildOptions", "flag", "parse_int_list",
           "parse_str_list"]


def parse_int_list(s: str) -> list[int]:
    """``"0-3,8"`` → ``[0, 1, 2, 3, 8]``: comma-separated ints and inclusive ``a-b`` ranges."""
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


def parse_str_list(s: str) -> list[str]:
    """``"q, k,v"`` → ``["q", "k", "v"]`` (empty items dropped)."""
    return [p.strip() for p in s.split(",") if p.strip()]


def flag(name: str) -> str:
    """The CLI flag of a field: ``skip_first_layers`` → ``--skip-first-layers``."""
    return "--" + name.replace("_", "-")


def _opt(default: Any, group: str, help: str, *, parse: Callable[[str], Any] | None = None,
         choices: Sequence[str] | None = None, record: bool = True) -> Any:
    """A BuildOptions field with its CLI metadata. ``parse`` defaults to ``str`` (bools take none);
    for a bool that defaults to True, ``help`` describes its ``--no-...`` switch. ``record=False``:
    a field that cannot change the adapter (how the build runs, e.g. ``threads``), left out of
    :meth:`BuildOptions.to_dict`, so it changes neither the recorded options nor a key made from them."""
    assert group in GROUPS, group
    if not isinstance(default, bool) and parse is None:
        parse = str
    return field(default=default, metadata={"group": group, "help": help, "parse": parse,
                                            "choices": tuple(choices) if choices is not None else None,
                                            "record": record})


PathLike = str | Path


@dataclass
class BuildOptions:
    """Everything ``build_adapter`` / ``rain build`` takes. Field order is the ``--help`` order."""

    # ---- models ----------------------------------------------------------------------------
    lrm: PathLike | None = _opt(None, "models", "reasoning model (dir or Hub id)")
    itm: PathLike | None = _opt(None, "models", "instruction-tuned model (dir or Hub id)")
    base: PathLike | None = _opt(None, "models", "the ITM's base model (dir or Hub id)")
    preset: str | None = _opt(None, "models", "fill --lrm/--itm/--base and name the output rain-<preset>",
                              choices=sorted(PRESETS))
    out: PathLike | None = _opt(None, "models",
                                "output adapter directory (default with --preset: <adapter home>/rain-<preset>)")
    overwrite: bool = _opt(False, "models", "replace an existing output directory")
    resume: bool = _opt(False, "models", "continue from <out>.partial if its settings match")
    # ---- scope -----------------------------------------------------------------------------
    method: str = _opt("rain", "scope", "merge method (rain_adapter.merging.methods.REGISTRY)", choices=method_names())
    targets: Sequence[str] | None = _opt(None, "scope", "roles, e.g. q,k,v,o,gate,up,down (default all)",
                                         parse=parse_str_list)
    layers: Sequence[int] | None = _opt(None, "scope", "layer ids, e.g. 0-3,8 (default all)", parse=parse_int_list)
    skip_first_layers: int = _opt(0, "scope", "do not merge the first N layers", parse=int)
    merge_bias: bool = _opt(False, "scope", "also store the ITM's bias deltas")
    # ---- stage 1 ---------------------------------------------------------------------------
    reasoning_calib: PathLike | list | None = _opt(
        None, "stage 1", "JSON/JSONL {prompt, reasoning, response} (default: the packaged set, or $RAIN_CALIB_DIR)")
    radius: int = _opt(DEFAULT_RADIUS, "stage 1", f"inner neighbours of <think>/</think> (default {DEFAULT_RADIUS})",
                       parse=int)
    projection: str = _opt("hard", "stage 1", "hard (default: the directions holding --protect-energy of the "
                           "feature energy), exact (every direction of the features above rtol: hard at 1.0), "
                           "ridge, none, or random: a control that removes as many input directions as hard, "
                           "drawn at random (seeded by --seed)", choices=PROJECTIONS)
    project_layers: Sequence[int] | None = _opt(
        None, "stage 1", "project only these layers, e.g. 0-13 (default all; the others keep the plain task "
        "vector; early layers only: more accuracy in 6 of 8 toy worlds, less in 1, and a broken thinking format "
        "in the 4 format worlds, bench/RESULTS.md)", parse=parse_int_list)
    protect_energy: float = _opt(DEFAULT_PROTECT_ENERGY, "stage 1", "hard: fraction of feature energy protected "
                                 f"(default {DEFAULT_PROTECT_ENERGY}; 1.0 = exact)", parse=float)
    ridge: float = _opt(DEFAULT_RIDGE, "stage 1", f"ridge: rho / mean(s^2) (default {DEFAULT_RIDGE})", parse=float)
    svd_dtype: str = _opt("float32", "stage 1", "dtype of the feature SVD / projection", choices=["float32", "float64"])
    max_samples: int | None = _opt(None, "stage 1", "use at most N reasoning calibration samples (default all)",
                                   parse=int)
    min_samples: int = _opt(DEFAULT_MIN_SAMPLES, "stage 1", "fail when fewer calibration samples are usable "
                            f"(default {DEFAULT_MIN_SAMPLES})", parse=int)
    max_seq_len: int = _opt(4096, "stage 1", "skip samples longer than this many tokens up to </think> (default 4096)",
                            parse=int)
    batch_size: int = _opt(1, "stage 1", "calibration samples per forward pass (default 1)", parse=int)
    sequential: bool = _opt(False, "stage 1", "layer-by-layer feature capture (model larger than device)")
    density: float = _opt(DEFAULT_DENSITY, "stage 1", "ties / dare-ties: fraction of entries kept", parse=float)
    drop: float = _opt(DEFAULT_DROP, "stage 1", "dare-ties: drop probability", parse=float)
    seed: int = _opt(0, "stage 1", "dare-ties drops, --projection random's subspaces", parse=int)
    # ---- stage 2 ---------------------------------------------------------------------------
    instruction_calib: PathLike | list | None = _opt(None, "stage 2", "instruction calibration JSONL (runs Stage 2)")
    no_stage2: bool = _opt(False, "stage 2", "skip Stage 2 even with --instruction-calib (α = 1)")
    rho: float = _opt(DEFAULT_RHO, "stage 2", f"ρ in g = a − ρ·u: weight of the unrelated-span attention (default "
                      f"{DEFAULT_RHO:g}, chosen by the Stage 2 trial in bench/RESULTS.md; the paper's: 0.5)", parse=float)
    alpha_grad: str = _opt("level", "stage 2", "level: g = a(λ=1) − ρ·u(λ=1); gain: the change from λ = 0 (default level)",
                           choices=["level", "gain"])
    alpha_norm: str = _opt("mean", "stage 2", "mean: α = clip(c·α_raw, 0, alpha_max) with c chosen so mean(α) = 1 after clipping (λ then "
                           "means the same as for rain-stage1); none: α = clip(α_raw, 0, alpha_max) (default mean)",
                           choices=["mean", "none"])
    alpha_max: float = _opt(1.5, "stage 2", "clip α to [0, alpha_max]; ≥ 1 with --alpha-norm mean (default 1.5)", parse=float)
    o_alpha: str = _opt("mean", "stage 2", "o_proj: layer-mean α (default; keeps the Stage 1 constraint) or "
                        "per-head input columns", choices=["mean", "head"])
    stage2_max_samples: int | None = _opt(None, "stage 2", "default: --max-samples", parse=int)
    stage2_max_seq_len: int | None = _opt(None, "stage 2", "default: --max-seq-len", parse=int)
    # ---- storage and compute ---------------------------------------------------------------
    storage: str = _opt("dense", "storage and compute", "dense Δ, or a truncated SVD (needs --rank or "
                        "--rank-energy)", choices=STORAGES)
    rank: int | None = _opt(None, "storage and compute", "lowrank: rank per module", parse=int)
    rank_energy: float | None = _opt(None, "storage and compute", "lowrank: per module the smallest rank keeping "
                                     "this fraction of ‖Δ‖²", parse=float)
    max_rank: int | None = _opt(None, "storage and compute", "lowrank: cap on the rank from --rank-energy",
                                parse=int)
    dtype: str = _opt("float32", "storage and compute", "LRM dtype for the forward passes", choices=sorted(DTYPES))
    device: str | None = _opt(None, "storage and compute", "cpu, cuda, cuda:1 ... (default: where the model loads); "
                              "with --device-map only where the projection runs (the LRM is not moved)")
    device_map: str | None = _opt(
        None, "storage and compute", "run the LRM dispatched by accelerate: auto, balanced, balanced_low_0, "
        "sequential, cpu, or a JSON object / JSON file {module: device} with devices GPU index, cpu, disk "
        "(features and Stage 2 statistics computed across devices; task vectors still stream from the shards; "
        "not with --sequential)", record=False)
    max_memory: str | None = _opt(None, "storage and compute", "with --device-map auto/balanced: JSON object or "
                                  "file {device: size}, e.g. '{\"0\": \"70GiB\", \"cpu\": \"200GiB\"}'", record=False)
    offload_folder: PathLike | None = _opt(None, "storage and compute", "with --device-map: where transformers "
                                           "writes 'disk' modules it cannot read from the safetensors shards",
                                           record=False)
    dry_run: bool = _opt(False, "storage and compute", "print the plan (as rain plan) and the resolved device map, "
                         "load no weights, write nothing", record=False)
    plan_profile: str = _opt("cpu", "storage and compute", "--dry-run: the device profile of the plan (rain plan "
                             "--profile; default cpu)", choices=sorted(PROFILES), record=False)
    threads: int | None = _opt(None, "storage and compute", "torch CPU threads for the build (torch.set_num_threads, "
                               "restored after it; default: leave torch's setting); not recorded in the adapter",
                               parse=int, record=False)
    feature_cache: PathLike | None = _opt(
        None, "storage and compute", "directory that keeps the Stage 1 features of this LRM + calibration set; a "
        "later build with other projection settings reuses them instead of running the forward again (default: off)")
    progress: bool = _opt(True, "storage and compute", "hide the progress bars")
    verbose: bool = _opt(True, "storage and compute", "do not print the per-module table and the build log")

    # ---- derived ---------------------------------------------------------------------------
    @property
    def model_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.svd_dtype]

    def resolved(self) -> BuildOptions:
        """A copy with ``--preset`` applied: missing lrm / itm / base from the preset, and ``out``
        defaulting to ``<adapter home>/rain-<preset>``. Without a preset: ``self`` unchanged."""
        if self.preset is None:
            return self
        try:
            p = get_preset(self.preset)
        except ValueError as e:
            raise BuildError(f"--preset: {e}", field="preset") from None
        out = self.out
        if out is None:
            out = adapter_home() / preset_output_name(self.preset)
        return replace(self, lrm=self.lrm or p.lrm, itm=self.itm or p.itm, base=self.base or p.base, out=out)

    def validate(self) -> None:
        """Every check that needs no model; raises :class:`BuildError` naming the field."""
        try:
            get_method(self.method)
        except ValueError as e:
            raise BuildError(f"--method: {e}", field="method") from None
        resolved = self.resolved()
        missing = [n for n in MODEL_FIELDS if getattr(resolved, n) is None]
        if missing:
            raise BuildError(f"missing {', '.join(flag(m) for m in missing)} (or give --preset)", field=missing[0])
        self._check_choices()
        self._check_ranges()
        self._check_storage()
        self._check_dispatch()
        if self.targets:
            try:
                validate_roles(self.targets)
            except ValueError as e:
                raise BuildError(f"--targets: {e}", field="targets") from None

    def _check_choices(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value is not None and value not in choices:
                raise BuildError(f"{flag(f.name)} must be one of {list(choices)}, got {value!r}", field=f.name)

    def _check_ranges(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise BuildError(f"--threads must be ≥ 1, got {self.threads}", field="threads")
        if not 0.0 <= self.protect_energy <= 1.0:
            raise BuildError(f"--protect-energy must be in [0, 1], got {self.protect_energy}", field="protect_energy")
        if self.projection == "ridge" and self.ridge <= 0:
            raise BuildError(f"--ridge must be > 0, got {self.ridge}", field="ridge")
        if self.projection == "exact" and self.protect_energy not in (DEFAULT_PROTECT_ENERGY, 1.0):
            raise BuildError(f"--protect-energy {self.protect_energy} does not apply to --projection exact (it "
                             "removes every direction of the features); use --projection hard for a fraction",
                             field="protect_energy")
        if get_method(self.method).stage2 and self.alpha_norm == "mean" and not self.alpha_max >= 1:
            raise BuildError(f"--alpha-max {self.alpha_max} < 1: α clipped to [0, alpha_max] cannot have mean 1 "
                             "(--alpha-norm mean); raise --alpha-max or use --alpha-norm none", field="alpha_max")

    def _check_dispatch(self) -> None:
        """--device-map / --max-memory / --offload-folder: syntax and combinations (module names are
        checked against the LRM's skeleton in the pre-flight)."""
        from .dispatch import parse_device_map, parse_max_memory  # the parsers live with the loader

        if self.device_map is None:
            for name in ("max_memory", "offload_folder"):
                if getattr(self, name) is not None:
                    raise BuildError(f"{flag(name)} only applies with --device-map", field=name)
            return
        if self.sequential:
            raise BuildError("--sequential and --device-map both decide where the LRM's layers run (--sequential "
                             "moves one decoder layer at a time to --device; --device-map has accelerate place and "
                             "offload them, and the build never moves them): choose one", field="device_map")
        dm = parse_device_map(self.device_map)
        if self.max_memory is not None:
            if not isinstance(dm, str):
                raise BuildError("--max-memory only applies with --device-map auto / balanced / balanced_low_0 / "
                                 "sequential (an explicit map already places every module)", field="max_memory")
            parse_max_memory(self.max_memory)

    def _check_storage(self) -> None:
        fc = Path(self.feature_cache).expanduser() if self.feature_cache is not None else None
        if fc is not None and fc.exists() and not fc.is_dir():
            raise BuildError(f"--feature-cache {self.feature_cache} exists and is not a directory",
                             field="feature_cache")
        if self.storage == "lowrank" and self.rank is None and self.rank_energy is None:
            raise BuildError("--storage lowrank needs --rank R or --rank-energy E", field="rank")
        if self.storage == "dense" and (self.rank is not None or self.rank_energy is not None):
            raise BuildError("--rank / --rank-energy only apply with --storage lowrank",
                             field="rank" if self.rank is not None else "rank_energy")

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: paths as strings, sequences as lists, an in-memory calibration list as a
        ``"<N in-memory records>"`` note (the calibration hash in ``config.stage1`` identifies it).
        Every field but those that cannot change the adapter (``record=False``: ``threads``), so
        builds that differ only in those record the same options (and keys hashed from this
        dict, e.g. the demo's adapter directories, stay the same)."""
        return {f.name: _json_safe(getattr(self, f.name)) for f in fields(self) if f.metadata.get("record", True)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildOptions:
        """The inverse of :meth:`to_dict` (for options recorded with paths); unknown keys are an error."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise BuildError(f"unknown build option(s) {unknown}", field=unknown[0])
        return cls(**data)


def _json_safe(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        if value and isinstance(value[0], dict):  # calibration records passed in memory
            return f"<{len(value)} in-memory records>"
        return [_json_safe(v) for v in value]
    return value
