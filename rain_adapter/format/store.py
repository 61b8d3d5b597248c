"""Read, write and find adapter directories (docs/DESIGN.md §3).

Layout::

    <dir>/adapter_config.json
    <dir>/adapter_model.safetensors            # or -0000i-of-0000n shards + .index.json
    <dir>/README.md

Tensor keys are ``<module path>.rain_delta`` (dense ``[out, in]``), ``.lora_A`` ``[r, in]`` /
``.lora_B`` ``[out, r]`` (low-rank; ``rain_A`` / ``rain_B`` in format version 1, which still loads)
and ``.rain_bias`` ``[out]``. safetensors only, never pickle.
Writes are atomic: everything goes to a temporary sibling directory that is renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import CONFIG_NAME, FORMAT_VERSION, ConfigError, RainConfig
from .delta import SUFFIXES_BY_VERSION, ModuleDelta
from .errors import AdapterError, AdapterNotFoundError
from .paths import adapter_home

WEIGHTS_NAME = "adapter_model.safetensors"
INDEX_NAME = "adapter_model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30


# ---------------------------------------------------------------------------------------------
# atomic directories
# ---------------------------------------------------------------------------------------------
@contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False):
    """Yield a temporary sibling directory; on success rename it to ``path``.

    On any exception the temporary directory is removed and ``path`` is untouched, so a reader
    never sees a half-written adapter.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            trash = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, trash)
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def _flatten(deltas: dict[str, ModuleDelta], dtype: torch.dtype | None) -> dict[str, Tensor]:
    flat = {}
    for module, d in deltas.items():
        if not isinstance(d, ModuleDelta):
            raise TypeError(f"module {module!r}: expected ModuleDelta, got {type(d).__name__}")
        for suffix, t in d.tensors().items():
            if not torch.isfinite(t).all():
                raise AdapterError(f"module {module!r}: {suffix} holds NaN or Inf")
            t = t.detach().to("cpu", dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
            flat[f"{module}.{suffix}"] = t.contiguous()
    return flat


def _shards(flat: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, t in flat.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def default_readme(config: RainConfig, deltas: dict[str, ModuleDelta]) -> str:
    n = sum(d.numel() for d in deltas.values())
    lines = [
        f"# RAIN adapter for `{config.base_model_name_or_path or 'an LRM'}`",
        "",
        "Built with [rain-adapter](https://pypi.org/project/rain-adapter/) (RAIN-Merging).",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| LRM | `{config.base_model_name_or_path}` |",
        f"| instruction model | `{config.itm_name_or_path}` |",
        f"| its base | `{config.itm_base_name_or_path}` |",
        f"| method | {config.method} |",
        f"| storage | {config.storage} (rank {config.rank}) |",
        f"| modules | {len(deltas)} ({', '.join(config.target_modules)}) |",
        f"| parameters | {n:,} |",
        f"| default λ | {config.default_lambda} (range {config.lambda_range}) |",
        "",
        "```python",
        "from rain_adapter import RainAdapter",
        "model = RainAdapter.attach(lrm, \"<this directory>\")",
        "model.set_lambda(0.6)   # instruction strength; 0 = the bare LRM",
        "```",
    ]
    if config.fidelity.get("overall"):
        lines += ["", "## Low-rank fidelity", "", "```", json.dumps(config.fidelity["overall"], indent=1), "```"]
    return "\n".join(lines) + "\n"


def save_adapter(
    deltas: dict[str, ModuleDelta],
    config: RainConfig,
    path: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    readme: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``deltas`` and ``config`` as an adapter directory, atomically.

    ``dtype`` casts floating tensors before writing (default: keep them). Big adapters are sharded
    at ``max_shard_bytes`` with an index file, like HF checkpoints.
    """
    if not deltas:
        raise AdapterError("refusing to write an adapter with no module deltas")
    config.validate()
    # the tensors are written with this version's keys, whatever version the config was read as
    config = replace(config, format_version=FORMAT_VERSION)
    lowrank = any(d.is_lowrank for d in deltas.values())
    if lowrank != (config.storage == "lowrank"):
        raise AdapterError(
            f"config.storage is {config.storage!r} but the deltas are {'low-rank' if lowrank else 'dense'}"
        )
    flat = _flatten(deltas, dtype)
    shards = _shards(flat, max_shard_bytes)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            n = len(shards)
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                fname = f"adapter_model-{i:05d}-of-{n:05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                for k, t in shard.items():
                    weight_map[k] = fname
                    total += t.numel() * t.element_size()
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config.save(tmp / CONFIG_NAME)
        (tmp / "README.md").write_text(readme if readme is not None else default_readme(config, deltas))
    return Path(path)


# ---------------------------------------------------------------------------------------------
# resolve + load
# ---------------------------------------------------------------------------------------------
def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_adapter(name_or_path: str | Path) -> Path:
    """An existing directory; else ``adapter_home()/<name>``; else a Hugging Face Hub repo id."""
    looked: list[str] = []
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    looked.append(f"directory {p}")
    home = adapter_home() / str(name_or_path)
    if home.is_dir():
        return home
    looked.append(f"adapter home {home} (set RAIN_ADAPTER_HOME to change)")
    name = str(name_or_path)
    if _looks_like_repo_id(name):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=name, allow_patterns=["*.json", "*.safetensors", "*.md"]))
        except Exception as e:  # offline, unknown repo, no auth ...
            looked.append(f"Hugging Face Hub repo {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    else:
        looked.append(f"Hugging Face Hub (skipped: {name!r} is not an owner/name repo id)")
    raise AdapterNotFoundError(f"adapter {name!r} not found; looked in:\n  - " + "\n  - ".join(looked))


def _weight_files(root: Path) -> list[Path]:
    index = root / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise AdapterError(f"{index}: unreadable index ({e})") from None
        files = sorted({root / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise AdapterError(f"{index}: names shard(s) that do not exist: {missing}")
        return files
    single = root / WEIGHTS_NAME
    if not single.is_file():
        raise AdapterError(f"{root}: no {WEIGHTS_NAME} (or {INDEX_NAME}) found")
    return [single]


def read_tensors(root: Path, device=None, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """All tensors of an adapter directory, every file opened with safetensors (never pickle)."""
    out = {}
    for f in _weight_files(root):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for k in fh.keys():
                    t = fh.get_tensor(k)
                    out[k] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise AdapterError(f"{f}: corrupt or truncated safetensors file ({e})") from None
    return out


def group_deltas(flat: dict[str, Tensor], source: str = "adapter",
                 format_version: int = FORMAT_VERSION) -> dict[str, ModuleDelta]:
    """``{"m.lora_A": t, "m.lora_B": t}`` -> ``{"m": ModuleDelta(lora_A=..., lora_B=...)}`` with checks;
    the key suffixes are those of ``format_version`` (``rain_A`` / ``rain_B`` in version 1)."""
    suffixes = SUFFIXES_BY_VERSION[format_version]
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in flat.items():
        module, _, suffix = key.rpartition(".")
        if suffix not in suffixes:
            raise AdapterError(f"{source}: unexpected tensor key {key!r} (format version {format_version} "
                               f"expects *.{'/'.join(suffixes)})")
        if not torch.isfinite(t).all():
            raise AdapterError(f"{source}: module {module!r}: {suffix} holds NaN or Inf")
        parts.setdefault(module, {})[suffixes[suffix]] = t
    out = {}
    for module, kw in parts.items():
        try:
            out[module] = ModuleDelta(**kw)
        except ValueError as e:
            raise AdapterError(f"{source}: module {module!r}: {e}") from None
    return out


def is_peft_dir(root: Path) -> bool:
    cfg = root / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        return "peft_type" in json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False


def load_adapter(
    name_or_path: str | Path, *, device=None, dtype: torch.dtype | None = None
) -> tuple[RainConfig, dict[str, ModuleDelta]]:
    """Resolve and read an adapter (a PEFT LoRA directory is imported with its scale folded)."""
    root = resolve_adapter(name_or_path)
    if is_peft_dir(root):
        from .peft_lora import load_peft_lora

        config, deltas = load_peft_lora(root)
        return config, {k: v.to(device=device, dtype=dtype) for k, v in deltas.items()}
    config = RainConfig.load(root)
    deltas = group_deltas(read_tensors(root, device=device, dtype=dtype), source=str(root),
                          format_version=config.format_version)
    if not deltas:
        raise AdapterError(f"{root}: adapter holds no tensors")
    return config, deltas


def adapter_from(
    adapter: "str | Path | tuple[RainConfig, dict[str, ModuleDelta]]",
) -> tuple[RainConfig, dict[str, ModuleDelta], str]:
    """``(config, deltas, source)`` from a name / path (loaded) or an in-memory ``(config, deltas)`` pair."""
    if isinstance(adapter, tuple):
        config, deltas = adapter
        return config, deltas, "<in-memory>"
    config, deltas = load_adapter(adapter)
    return config, deltas, str(adapter)


__all__ = [
    "adapter_from",
    "AdapterError",
    "AdapterNotFoundError",
    "ConfigError",
    "atomic_dir",
    "load_adapter",
    "resolve_adapter",
    "save_adapter",
    "adapter_home",
]
