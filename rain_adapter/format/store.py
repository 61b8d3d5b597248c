"""Read, write and find adapter directories (docs/DESIGN.md §3).

Layout::

    <dir>/adapter_config.json
    <dir>/adapter_model.safetensors            # or -0000i-of-0000n shards + .index.json
    <dir>/README.md

Tensor keys are ``<module path>.rain_delta`` (dense ``[out, in]``), ``.lora_A`` ``[r, in]`` /
``.lora_B`` ``[out, r]`` (low-rank) and ``.rain_bias`` ``[out]`` (format version 2, the only one).
safetensors only, never pickle.
Writes are atomic: everything goes to a temporary sibling directory that is renamed at the end.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import CONFIG_NAME, ConfigError, RainConfig, checked_file, read_json
from .delta import SUFFIXES, ModuleDelta
from .errors import AdapterError, AdapterNotFoundError
from .paths import adapter_home

WEIGHTS_NAME = "adapter_model.safetensors"
INDEX_NAME = "adapter_model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30


# ---------------------------------------------------------------------------------------------
# atomic directories, ownership markers, disk errors
# ---------------------------------------------------------------------------------------------
#: The file that marks a temporary directory as made by this library (the ``.<name>.tmp-*`` of an
#: atomic write, a build's ``<out>.partial``). A cleanup only ever deletes a directory holding it, so
#: a directory the user made under one of these names is never removed.
MARKER_NAME = ".rain-partial"
_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)(?: at path \"([^\"]*)\")?")


def write_marker(path: Path, kind: str) -> None:
    """Mark directory ``path`` as ours (``kind``: what it is), so a later cleanup may delete it."""
    (path / MARKER_NAME).write_text(json.dumps({"created_by": "rain_adapter", "kind": kind, "pid": os.getpid()}))


def has_marker(path: Path) -> bool:
    """Whether ``path`` is a directory this library created (it holds a readable marker)."""
    try:
        return json.loads((Path(path) / MARKER_NAME).read_text()).get("created_by") == "rain_adapter"
    except (OSError, ValueError, AttributeError):
        return False


def remove_ours(path: Path) -> bool:
    """Delete directory ``path`` only if it carries the marker; whether it was deleted."""
    if not has_marker(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def check_replaceable(path: Path, identity: str = CONFIG_NAME, what: str = "an adapter directory") -> None:
    """What ``overwrite`` may replace: nothing, an empty directory, or a directory holding ``identity``
    (an adapter's ``adapter_config.json``; an exported model's ``config.json``). Anything else
    (``--out ~ --overwrite``) is refused before any work."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and ((path / identity).is_file() or not any(path.iterdir()))):
        return
    kind = "a directory with other files" if path.is_dir() else "not a directory"
    raise FileExistsError(f"{path} is {kind}, not {what} (no {identity}); --overwrite only replaces "
                          f"{what}: choose another output path")


def check_writable(path: Path) -> None:
    """PermissionError (EACCES) now, before any work, when ``path`` could not be created: its nearest
    existing ancestor is not a writable directory."""
    parent = Path(path).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(parent))


def os_error_of(exc: BaseException) -> OSError | None:
    """``exc`` as an OSError with an errno, if it is one: an OSError itself, or safetensors'
    ``SafetensorError`` whose message carries ``(os error N) at path "..."`` (safetensors reports
    I/O failures that way)."""
    if isinstance(exc, OSError):
        return exc if exc.errno is not None else None
    m = _OS_ERROR_RE.search(str(exc)) if isinstance(exc, SafetensorError) else None
    if m is None:
        return None
    code = int(m.group(1))
    return OSError(code, os.strerror(code), m.group(2)) if m.group(2) else OSError(code, os.strerror(code))


@contextmanager
def disk_errors(path: str | Path):
    """Re-raise a failed write of ``path`` as an OSError naming it (a SafetensorError carrying an
    OS error number becomes that OSError), so a full disk reads as one clear line."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        err = os_error_of(e)
        if err is None or (err is e and e.filename):
            raise
        raise type(err)(err.errno, err.strerror, err.filename or str(path)) from e


@contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False,
               replace_check: Callable[[Path], None] | None = None):
    """Yield a temporary sibling directory; on success rename it to ``path``.

    On any exception the temporary directory is removed and ``path`` is untouched, so a reader
    never sees a half-written adapter. The temporary directory carries the marker while it is
    written (so a leftover is recognisably ours); it is removed just before the rename.
    ``replace_check(path)`` (e.g. :func:`check_replaceable`) vets an existing ``path`` before
    ``overwrite`` replaces it.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    if path.exists() and replace_check is not None:
        replace_check(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_marker(tmp, "atomic-write")
        yield tmp
        (tmp / MARKER_NAME).unlink()
        if path.exists():
            trash = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, trash)
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        # made just above under a fresh random name by mkdir (which fails if it exists): ours
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

    ``overwrite`` replaces an existing adapter directory (or an empty one), never another kind of
    directory (:func:`check_replaceable`); a failed write (a full disk) leaves no temporary
    directory behind and raises an OSError naming the file. ``dtype`` casts floating tensors before writing (default: keep them). Big adapters are sharded
    at ``max_shard_bytes`` with an index file, like HF checkpoints.
    """
    if not deltas:
        raise AdapterError("refusing to write an adapter with no module deltas")
    config.validate()  # format_version is FORMAT_VERSION, whose keys the tensors are written with
    lowrank = any(d.is_lowrank for d in deltas.values())
    if lowrank != (config.storage == "lowrank"):
        raise AdapterError(
            f"config.storage is {config.storage!r} but the deltas are {'low-rank' if lowrank else 'dense'}"
        )
    flat = _flatten(deltas, dtype)
    shards = _shards(flat, max_shard_bytes)
    with atomic_dir(path, overwrite=overwrite, replace_check=check_replaceable) as tmp:
        if len(shards) == 1:
            with disk_errors(tmp / WEIGHTS_NAME):
                save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            n = len(shards)
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                fname = f"adapter_model-{i:05d}-of-{n:05d}.safetensors"
                with disk_errors(tmp / fname):
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
    """An existing directory; else ``adapter_home()/<name>``; else a Hugging Face Hub repo id.

    An empty name is a ``ValueError``, not the current directory."""
    if not str(name_or_path).strip():
        raise ValueError(f"adapter name is empty ({str(name_or_path)!r}); give a directory, a name or a Hub id")
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
    """The index's shards or the single weights file; each must be a plain file name of a regular
    file inside ``root`` (:func:`checked_file`, before anything opens it: no ``..``, no absolute
    path, no symlink out, no FIFO or device)."""
    index = root / INDEX_NAME
    if not (index.exists() or index.is_symlink()):
        checked_file(root / WEIGHTS_NAME, AdapterError, root=root, missing=f"{root}: no {WEIGHTS_NAME} (or {INDEX_NAME}) found")
        return [root / WEIGHTS_NAME]
    data = read_json(index, AdapterError, missing=f"{index}: not found", root=root)
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise AdapterError(f"{index}: unreadable index (needs a 'weight_map' of tensor name -> file name)")
    for key, name in wmap.items():
        if not name.strip() or Path(name).is_absolute() or ".." in Path(name).parts:
            raise AdapterError(f"{index}: weight_map entry {key!r} -> {name!r} is not a file inside {root}")
    names = sorted(set(wmap.values()))
    for n in names:
        checked_file(root / n, AdapterError, root=root, missing=f"{index}: names shard(s) that do not exist: {n!r}")
    return [root / n for n in names]


def read_tensors(root: Path, device=None, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """All tensors of an adapter directory, every file opened with safetensors (never pickle)."""
    out = {}
    for f in _weight_files(root):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for k in fh.keys():
                    if k in out:
                        raise AdapterError(f"{f}: tensor {k!r} is also in another shard")
                    t = fh.get_tensor(k)
                    out[k] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise AdapterError(f"{f}: corrupt or truncated safetensors file ({e})") from None
    return out


def group_deltas(flat: dict[str, Tensor], source: str = "adapter") -> dict[str, ModuleDelta]:
    """``{"m.lora_A": t, "m.lora_B": t}`` -> ``{"m": ModuleDelta(lora_A=..., lora_B=...)}`` with checks;
    the key suffixes are :data:`~rain_adapter.format.delta.SUFFIXES`."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in flat.items():
        module, _, suffix = key.rpartition(".")
        if suffix not in SUFFIXES:
            raise AdapterError(f"{source}: unexpected tensor key {key!r} (expected *.{'/'.join(SUFFIXES)})")
        if not torch.isfinite(t).all():
            raise AdapterError(f"{source}: module {module!r}: {suffix} holds NaN or Inf")
        parts.setdefault(module, {})[SUFFIXES[suffix]] = t
    out = {}
    for module, kw in parts.items():
        try:
            out[module] = ModuleDelta(**kw)
        except ValueError as e:
            raise AdapterError(f"{source}: module {module!r}: {e}") from None
    return out


def is_peft_dir(root: Path) -> bool:
    """Whether ``root``'s config is a PEFT one (has ``peft_type``); read with the capped, regular-file-only
    reader, so a bad config is a :class:`ConfigError` naming it."""
    cfg = root / CONFIG_NAME
    if not (cfg.exists() or cfg.is_symlink()):
        return False
    data = read_json(cfg, ConfigError, missing=f"{cfg}: no adapter config found", root=root)
    return isinstance(data, dict) and "peft_type" in data


def load_adapter(
    name_or_path: str | Path, *, device=None, dtype: torch.dtype | None = None
) -> tuple[RainConfig, dict[str, ModuleDelta]]:
    """Resolve and read an adapter (a PEFT LoRA directory is imported with its scale folded).

    Only regular files inside the directory are read; the tensors must agree with the config's
    ``storage``, ``layers`` and ``rank`` (:meth:`RainConfig.check_deltas`); every error names the
    file or module."""
    root = resolve_adapter(name_or_path)
    if is_peft_dir(root):
        from .peft_lora import load_peft_lora

        config, deltas = load_peft_lora(root)
        return config, {k: v.to(device=device, dtype=dtype) for k, v in deltas.items()}
    config = RainConfig.load(root)
    deltas = group_deltas(read_tensors(root, device=device, dtype=dtype), source=str(root))
    if not deltas:
        raise AdapterError(f"{root}: adapter holds no tensors")
    config.check_deltas(deltas, source=str(root))
    return config, deltas


def adapter_from(
    adapter: "str | Path | tuple[RainConfig, dict[str, ModuleDelta]]",
) -> tuple[RainConfig, dict[str, ModuleDelta], str]:
    """``(config, deltas, source)`` from a name / path (loaded) or an in-memory ``(config, deltas)`` pair."""
    if isinstance(adapter, tuple):
        if len(adapter) != 2 or not isinstance(adapter[0], RainConfig) or not isinstance(adapter[1], dict):
            raise AdapterError("an in-memory adapter is a (RainConfig, {module: ModuleDelta}) pair")
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
