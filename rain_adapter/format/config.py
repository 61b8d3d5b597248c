"""``adapter_config.json``: the RainConfig schema (format version 2; version 1 still loads), validated on load.

Version 2 renamed the low-rank tensor keys ``rain_A`` / ``rain_B`` to PEFT's ``lora_A`` / ``lora_B``
(same orientation); nothing else changed (docs/DESIGN.md §3).
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .arch import ROLES

CONFIG_NAME = "adapter_config.json"
FORMAT = "rain-adapter"
FORMAT_VERSION = 2
#: the versions this library reads (it writes FORMAT_VERSION)
READABLE_VERSIONS = (1, 2)
STORAGES = ("dense", "lowrank")

#: Fields a file must carry (the rest have defaults).
REQUIRED = ("format", "format_version", "base_model_name_or_path", "target_modules", "layers", "storage")


def read_json(path: Path, error: type[Exception], *, missing: str) -> Any:
    """The JSON in ``path``; a missing file raises ``error(missing)``, bad JSON ``error`` naming the file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(missing) from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None


class ConfigError(ValueError):
    """An adapter config that does not follow the schema; the message names the file and field."""


@dataclass
class RainConfig:
    """The adapter's metadata. See docs/DESIGN.md §3.

    ``stage1`` / ``stage2`` / ``fidelity`` are free-form reports written by the build (per-module
    statistics, α tables); ``fingerprint`` maps module name -> ``{"shape": [out, in], "hash": str}``.
    """

    base_model_name_or_path: str = ""
    target_modules: list[str] = field(default_factory=lambda: list(ROLES))
    layers: list[int] = field(default_factory=list)
    storage: str = "dense"
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    itm_name_or_path: str = ""
    itm_base_name_or_path: str = ""
    #: the build method's registry name (rain_adapter.build.methods), "peft-import" or "custom";
    #: informative only: attach treats every adapter alike (W + λ·D)
    method: str = "rain"
    rank: int | dict[str, int] | None = None
    default_lambda: float = 1.0
    lambda_range: list[float] = field(default_factory=lambda: [0.0, 2.0])
    dtype: str = "float32"
    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self, source: str = "adapter config") -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: field {name!r} {why}")

        if self.format != FORMAT:
            raise bad("format", f"must be {FORMAT!r}, got {self.format!r}")
        if type(self.format_version) is not int or self.format_version not in READABLE_VERSIONS:
            raise bad("format_version", f"is {self.format_version!r}; this library reads versions "
                                        f"{', '.join(map(str, READABLE_VERSIONS))}")
        if self.storage not in STORAGES:
            raise bad("storage", f"must be one of {STORAGES}, got {self.storage!r}")
        if not isinstance(self.target_modules, list) or not all(t in ROLES for t in self.target_modules):
            raise bad("target_modules", f"must be a list of roles from {list(ROLES)}, got {self.target_modules!r}")
        if not isinstance(self.layers, list) or not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise bad("layers", f"must be a list of non-negative ints, got {self.layers!r}")
        lr = self.lambda_range
        if (
            not isinstance(lr, (list, tuple)) or len(lr) != 2
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in lr) or lr[0] > lr[1]
        ):
            raise bad("lambda_range", f"must be [low, high] finite with low <= high, got {lr!r}")
        self.lambda_range = [float(lr[0]), float(lr[1])]
        if not isinstance(self.default_lambda, (int, float)) or not math.isfinite(self.default_lambda):
            raise bad("default_lambda", f"must be a finite number, got {self.default_lambda!r}")
        if not lr[0] <= self.default_lambda <= lr[1]:
            raise bad("default_lambda", f"{self.default_lambda} lies outside lambda_range {lr}")
        if self.rank is not None and not isinstance(self.rank, (int, dict)):
            raise bad("rank", f"must be an int, a {{module: int}} map or null, got {self.rank!r}")
        if self.storage == "lowrank" and self.rank is None:
            raise bad("rank", "is required when storage is 'lowrank'")
        for name in ("stage1", "stage2", "fidelity", "fingerprint", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "must be an object")
        if not isinstance(self.base_model_name_or_path, str):
            raise bad("base_model_name_or_path", "must be a string")

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
        """Read ``adapter_config.json`` (or the directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        data = read_json(path, ConfigError, missing=f"{path}: no adapter config found")
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path
