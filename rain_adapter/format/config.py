"""``adapter_config.json``: the RainConfig schema (format version 2, the only one), validated on load.

A file of another ``format_version`` is a :class:`ConfigError` naming the file, the field and the
supported version; the tensor keys of format version 2 are in :mod:`rain_adapter.format.delta`
(docs/DESIGN.md §3).
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .arch import ROLES, module_layer
from .delta import ModuleDelta
from .lambdas import MAX_ABS_LAMBDA

CONFIG_NAME = "adapter_config.json"
FORMAT = "rain-adapter"
#: the format version this library writes and the only one it reads
FORMAT_VERSION = 2
#: the scheme of the fingerprint records it writes and the only one it reads (format/fingerprint.py)
FINGERPRINT_SCHEME = 2
STORAGES = ("dense", "lowrank")

#: The most bytes a JSON file of an adapter (config, shard index) may hold; a bigger one is refused.
MAX_JSON_BYTES = 16 * 2**20

#: Fields a file must carry (the rest have defaults).
REQUIRED = ("format", "format_version", "base_model_name_or_path", "target_modules", "layers", "storage")


def checked_file(path: Path, error: type[Exception], *, root: Path | None = None,
                 missing: str | None = None) -> Path:
    """``path`` resolved, after checking it is a regular file (inside ``root`` when given).

    Checked before anything opens it, so a FIFO, a device or a link to ``/dev/zero`` is an
    ``error`` naming the file instead of a read that hangs or never ends, and a symlink or ``..``
    out of an adapter directory is refused. In a Hugging Face cache snapshot
    (``…/snapshots/<rev>/``) the files link to ``…/blobs/``, which therefore counts as inside.
    """
    path = Path(path)
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise error(missing or f"{path}: no such file") from None
    except (OSError, RuntimeError) as e:  # a symlink loop, a permission error
        raise error(f"{path}: cannot be resolved ({e})") from None
    if root is not None:
        top = Path(root).resolve()
        inside = [top] + ([top.parent.parent / "blobs"] if top.parent.name == "snapshots" else [])
        if not any(real.is_relative_to(d) for d in inside):
            raise error(f"{path}: resolves to {real}, outside the adapter directory {top}")
    try:
        mode = os.stat(real).st_mode
    except OSError as e:
        raise error(f"{path}: cannot be read ({e})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path}: not a regular file (a FIFO, device, socket or directory); refusing to read it")
    return real


def read_json(path: Path, error: type[Exception], *, missing: str, root: Path | None = None,
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON in ``path``, the one JSON reader of adapter files (configs, shard indexes).

    A missing file raises ``error(missing)``; a file that is not a regular file (or lies outside
    ``root``, see :func:`checked_file`), is larger than ``max_bytes``, or is not valid JSON raises
    ``error`` naming the file. At most ``max_bytes + 1`` bytes are read, so nothing can make it
    hang or fill memory.
    """
    real = checked_file(path, error, root=root, missing=missing)
    try:
        # O_NONBLOCK: should the file be swapped for a FIFO after the check, open() still returns
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise error(f"{path}: not a regular file; refusing to read it")
            data = fh.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{path}: cannot be read ({e})") from None
    if len(data) > max_bytes:
        raise error(f"{path}: larger than {max_bytes} bytes; not an adapter file")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None


class ConfigError(ValueError):
    """An adapter config that does not follow the schema; the message names the file and field."""


def is_int(v: Any) -> bool:
    """An int that is not a bool (JSON ``true`` is not a version, a rank or a layer). The one
    predicate every JSON reader here (config, PEFT config, server requests) uses."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """A finite int or float that is not a bool (JSON ``NaN`` / ``Infinity`` / ``true`` are not numbers)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too big for a float
        return False


def fingerprint_scheme_problem(record: Any) -> str | None:
    """Why ``record`` is not a fingerprint record of :data:`FINGERPRINT_SCHEME` (an object whose
    ``scheme`` field is that number); None if it is. Its ``shape`` and ``sample`` are checked
    where the record is compared (format/fingerprint.py)."""
    if not isinstance(record, dict):
        return f"must be an object, got {record!r:.80}"
    if "scheme" not in record:
        return (f"has no 'scheme' field; this library reads fingerprint scheme {FINGERPRINT_SCHEME} only "
                '({"shape": [out, in], "scheme": %d, "sample": str})' % FINGERPRINT_SCHEME)
    if not is_int(record["scheme"]) or record["scheme"] != FINGERPRINT_SCHEME:
        return (f"has field 'scheme' {record['scheme']!r:.80}; this library reads fingerprint scheme "
                f"{FINGERPRINT_SCHEME} only")
    return None


def _rank_problem(rank: Any) -> str | None:
    """Why ``rank`` is not null, an int > 0 or a non-empty ``{module: int > 0}`` map; None if it is."""
    if rank is None or (is_int(rank) and rank > 0):
        return None
    if isinstance(rank, dict) and rank:
        bad = {k: v for k, v in rank.items() if not isinstance(k, str) or not (is_int(v) and v > 0)}
        if not bad:
            return None
        return f"maps modules to ints > 0; bad entries {dict(list(bad.items())[:3])!r:.200}"
    return f"must be an int > 0, a non-empty {{module: int > 0}} map or null, got {rank!r:.80}"


@dataclass
class RainConfig:
    """The adapter's metadata. See docs/DESIGN.md §3.

    ``stage1`` / ``stage2`` / ``fidelity`` are free-form reports written by the build (per-module
    statistics, α tables); ``fingerprint`` maps module name -> ``{"shape": [out, in], "scheme": 2,
    "sample": str}`` (format/fingerprint.py); a record of another scheme is refused.
    """

    base_model_name_or_path: str = ""
    target_modules: list[str] = field(default_factory=lambda: list(ROLES))
    layers: list[int] = field(default_factory=list)
    storage: str = "dense"
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    itm_name_or_path: str = ""
    itm_base_name_or_path: str = ""
    #: the build method's registry name (rain_adapter.merging.methods), "peft-import" or "custom";
    #: informative only: attach treats every adapter alike (W + λ·D)
    method: str = "rain"
    rank: int | dict[str, int] | None = None
    default_lambda: float = 1.0
    lambda_range: list[float] = field(default_factory=lambda: [0.0, 2.0])
    #: λ* found by ``rain tune`` on a dev set (None: never tuned); tune also sets ``default_lambda``
    #: to it and ``lambda_range`` to the measured range, and records its report under ``tune``
    recommended_lambda: float | None = None
    dtype: str = "float32"
    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)
    tune: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self, source: str = "adapter config") -> None:
        """Check every field's type and value; a :class:`ConfigError` names ``source`` and the field.

        Strict on types because the file is user input: a bool is not an int (``format_version:
        true``), a rank is positive, numbers are finite.
        """
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: field {name!r} {why}")

        for name in ("format", "base_model_name_or_path", "itm_name_or_path", "itm_base_name_or_path",
                     "method", "dtype"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, f"must be a string, got {getattr(self, name)!r:.80}")
        if self.format != FORMAT:
            raise bad("format", f"must be {FORMAT!r}, got {self.format!r}")
        if not is_int(self.format_version) or self.format_version != FORMAT_VERSION:
            raise bad("format_version", f"is {self.format_version!r:.80}; this library reads format version "
                                        f"{FORMAT_VERSION} only")
        if not isinstance(self.storage, str) or self.storage not in STORAGES:
            raise bad("storage", f"must be one of {STORAGES}, got {self.storage!r:.80}")
        if not isinstance(self.target_modules, list) or not all(
                isinstance(t, str) and t in ROLES for t in self.target_modules):
            raise bad("target_modules", f"must be a list of roles from {list(ROLES)}, got {self.target_modules!r:.200}")
        if not isinstance(self.layers, list) or not all(is_int(i) and i >= 0 for i in self.layers):
            raise bad("layers", f"must be a list of non-negative ints, got {self.layers!r:.200}")
        why = _rank_problem(self.rank)
        if why:
            raise bad("rank", why)
        if self.storage == "lowrank" and self.rank is None:
            raise bad("rank", "is required when storage is 'lowrank'")
        self._validate_lambdas(bad)
        for name in ("stage1", "stage2", "fidelity", "tune", "fingerprint", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "must be an object")
        for module, record in self.fingerprint.items():
            why = fingerprint_scheme_problem(record)
            if why:
                raise ConfigError(f"{source}: field 'fingerprint', module {module!r:.120}: the record {why}")

    def _validate_lambdas(self, bad) -> None:
        """``lambda_range`` finite ``[low, high]`` within the hard λ bound (|λ| <= 100), ``default_lambda``
        a finite number inside it."""
        lr = self.lambda_range
        if (not isinstance(lr, (list, tuple)) or len(lr) != 2 or not all(is_finite_number(v) for v in lr)
                or lr[0] > lr[1]):
            raise bad("lambda_range", f"must be [low, high] finite with low <= high, got {lr!r:.80}")
        if max(abs(lr[0]), abs(lr[1])) > MAX_ABS_LAMBDA:  # the server accepts any λ inside the range
            raise bad("lambda_range", f"{lr} goes beyond the hard bound |λ| <= {MAX_ABS_LAMBDA:g}")
        self.lambda_range = [float(lr[0]), float(lr[1])]
        if not is_finite_number(self.default_lambda):
            raise bad("default_lambda", f"must be a finite number, got {self.default_lambda!r:.80}")
        if not lr[0] <= self.default_lambda <= lr[1]:
            raise bad("default_lambda", f"{self.default_lambda} lies outside lambda_range {lr}")
        rec = self.recommended_lambda
        if rec is not None and not (is_finite_number(rec) and lr[0] <= rec <= lr[1]):
            raise bad("recommended_lambda", f"must be null or a finite number inside lambda_range {lr}, got {rec!r:.80}")

    def check_deltas(self, deltas: dict[str, ModuleDelta], source: str = "adapter") -> None:
        """The deltas agree with ``storage``, ``layers`` and ``rank``; else an error naming ``source``
        and the module (:class:`ConfigError`, a ``ValueError``).

        ``dense`` holds ``rain_delta`` tensors and ``lowrank`` ``lora_A`` / ``lora_B`` pairs, never
        both; every module's layer is in ``layers``; a low-rank module's rank equals its entry of a
        ``{module: rank}`` map, and is at most an int ``rank`` (a fixed ``rank=R`` build keeps
        ``min(R, out, in)`` directions, so a smaller module can hold fewer).
        """
        layers = set(self.layers)
        for name, d in deltas.items():
            where = f"{source}: module {name!r}"
            if d.is_lowrank != (self.storage == "lowrank"):
                got = "lora_A / lora_B" if d.is_lowrank else "rain_delta"
                raise ConfigError(f"{where}: holds {got} tensors but the config says storage {self.storage!r}")
            try:
                layer = module_layer(name)
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
            if layer not in layers:
                raise ConfigError(f"{where}: layer {layer} is not in the config's layers {sorted(layers)}")
            want = self.rank.get(name) if isinstance(self.rank, dict) else self.rank
            if d.is_lowrank and want is not None and (d.rank > want if is_int(self.rank) else d.rank != want):
                raise ConfigError(f"{where}: low-rank factors have rank {d.rank} but the config's rank is "
                                  f"{want}")

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # Put the identifying fields first so the file reads well.
        head = ("format", "format_version", "base_model_name_or_path", "itm_name_or_path", "itm_base_name_or_path", "method")
        return {**{k: d[k] for k in head}, **{k: v for k, v in d.items() if k not in head}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> "RainConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {missing}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        kwargs = {k: v for k, v in data.items() if k in known}
        if unknown:
            # Forward compatible within a format version: keep unknown keys under `extra`.
            kwargs.setdefault("extra", {})
            kwargs["extra"] = {**kwargs["extra"], **{k: data[k] for k in unknown}}
        try:
            # The dataclass __post_init__ validates; re-validate with the file name for the message.
            cfg = cls.__new__(cls)
            for f in fields(cls):
                if f.name in kwargs:
                    value = kwargs[f.name]
                elif f.default_factory is not MISSING:  # type: ignore[misc]
                    value = f.default_factory()  # type: ignore[misc]
                else:
                    value = f.default
                setattr(cfg, f.name, value)
            cfg.validate(source)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from e
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "RainConfig":
        """Read ``adapter_config.json`` (or the directory holding it: then the file must lie inside it).

        Read with :func:`read_json` (regular file, at most :data:`MAX_JSON_BYTES`)."""
        path, root = Path(path), None
        if path.is_dir():
            path, root = path / CONFIG_NAME, path
        data = read_json(path, ConfigError, missing=f"{path}: no adapter config found", root=root)
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | Path) -> Path:
        """Write the JSON atomically (a temporary file in the same directory, then ``os.replace``), so
        rewriting a live adapter's config (``rain tune``) never leaves half a file."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        self.validate(str(path))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
