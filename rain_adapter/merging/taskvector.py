"""Streamed task vectors Δ_I^k = W_I^k − W_B^k from safetensors checkpoints (docs/DESIGN.md §5.1, §6.1).

The ITM and its base are never loaded as models: :class:`CheckpointReader` maps tensor names to
shard files (single ``model.safetensors`` or sharded with ``model.safetensors.index.json``) and
reads one tensor at a time with ``safe_open``. Deltas are computed in float32 (or the requested
dtype) from the stored dtype.

Shapes: a linear weight and its delta are ``[out, in]``; a bias delta is ``[out]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from ..format.delta import ModuleDelta
from .errors import BuildError
from .hub import check_name, fetching

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(BuildError):
    """A checkpoint that cannot supply the task vector; the message names the file and tensor."""


#: CheckpointReader label -> the BuildOptions field that names the checkpoint
_LABEL_FIELDS = {"ITM": "itm", "base": "base", "LRM": "lrm"}


def resolve_checkpoint_dir(name_or_path: str | os.PathLike, field: str | None = None) -> Path:
    """A local directory, or a Hub repo id fetched through the normal huggingface_hub cache
    (safetensors + json files only). A failed fetch is one ``HubFetchError`` line (``hub.fetching``)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    name = str(name_or_path)
    try:
        check_name(name, field)
    except BuildError:
        raise CheckpointError(f"checkpoint {name!r}: no such directory (and not a Hub repo id)",
                              field=field) from None
    if p.exists():
        raise CheckpointError(f"checkpoint {name!r}: not a directory", field=field)
    with fetching(name, field):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.json"]))


class CheckpointReader:
    """Lazy, tensor-at-a-time access to an HF safetensors checkpoint directory.

    ``loaded`` counts tensors materialised by :meth:`get` (tests use it to prove streaming).
    """

    def __init__(self, name_or_path: str | os.PathLike, label: str = "checkpoint"):
        self.label = label
        self.root = resolve_checkpoint_dir(name_or_path, _LABEL_FIELDS.get(label))
        self.loaded = 0
        self._weight_map: dict[str, Path] = {}
        index = self.root / INDEX_NAME
        single = self.root / SINGLE_NAME
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except Exception as e:
                raise CheckpointError(f"{label} {index}: unreadable index ({type(e).__name__}: {e})") from e
            for name, fname in wm.items():
                self._weight_map[name] = self.root / fname
            missing = sorted({str(f) for f in self._weight_map.values() if not f.is_file()})
            if missing:
                raise CheckpointError(f"{label} {index}: refers to missing shard file(s) {missing}")
        elif single.is_file():
            for name in self._keys_of(single):
                self._weight_map[name] = single
        else:
            files = sorted(self.root.glob("*.safetensors"))
            if not files:
                raise CheckpointError(
                    f"{label} {self.root}: no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors file "
                    "(only safetensors checkpoints are supported; no pickle)")
            for f in files:
                for name in self._keys_of(f):
                    self._weight_map[name] = f

    def _keys_of(self, file: Path) -> list[str]:
        try:
            with safe_open(str(file), "pt") as f:
                return list(f.keys())
        except Exception as e:
            raise CheckpointError(f"{self.label} shard {file}: unreadable ({type(e).__name__}: {e})") from e

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def file_of(self, name: str) -> Path:
        if name not in self._weight_map:
            raise CheckpointError(f"{self.label} {self.root}: tensor {name!r} is missing")
        return self._weight_map[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape, read from the shard header only (no data)."""
        file = self.file_of(name)
        try:
            with safe_open(str(file), "pt") as f:
                return tuple(f.get_slice(name).get_shape())
        except Exception as e:
            raise CheckpointError(
                f"{self.label} shard {file}: cannot read tensor {name!r} ({type(e).__name__}: {e})") from e

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """One tensor, cast to ``dtype`` on the CPU."""
        file = self.file_of(name)
        try:
            with safe_open(str(file), "pt") as f:
                t = f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(
                f"{self.label} shard {file}: cannot read tensor {name!r} ({type(e).__name__}: {e})") from e
        self.loaded += 1
        return t.to(dtype)

    def rows(self, name: str, rows: list[int]) -> Tensor:
        """Rows ``rows`` of the 2-D tensor ``name``, ``[len(rows), in]`` in the stored dtype, read
        row by row (``get_slice``): the rest of the tensor is never read. Not counted in ``loaded``."""
        file = self.file_of(name)
        try:
            with safe_open(str(file), "pt") as f:
                sl = f.get_slice(name)
                return torch.cat([sl[r:r + 1] for r in rows])
        except Exception as e:
            raise CheckpointError(
                f"{self.label} shard {file}: cannot read tensor {name!r} ({type(e).__name__}: {e})") from e


def _as_reader(x, label: str) -> CheckpointReader:
    return x if isinstance(x, CheckpointReader) else CheckpointReader(x, label)


def module_shapes(modules: Mapping[str, torch.nn.Module]) -> dict[str, tuple[tuple[int, int], bool]]:
    """``{name: ((out, in), has_bias)}`` from the LRM's targeted linears (RainLinear → ``.base``)."""
    out = {}
    for name, m in modules.items():
        lin = m if isinstance(m, torch.nn.Linear) else getattr(m, "base", m)
        out[name] = ((int(lin.weight.shape[0]), int(lin.weight.shape[1])), lin.bias is not None)
    return out


def check_task_vector(itm: CheckpointReader, base: CheckpointReader,
                      expected: Mapping[str, tuple[tuple[int, int], bool]], *, merge_bias: bool = False) -> None:
    """Check, from shard headers only, that ITM and base hold every expected module with the LRM's
    shape ``[out, in]`` (and, with ``merge_bias``, matching ``[out]`` biases). Raises
    :class:`CheckpointError` naming the module, the checkpoint and the file."""
    for name, ((o, i), _lrm_has_bias) in expected.items():
        wname = name + ".weight"
        for r in (itm, base):
            if wname not in r:
                raise CheckpointError(
                    f"module {name!r}: {r.label} checkpoint {r.root} has no tensor {wname!r} "
                    "(the ITM/base must have the LRM's architecture and module names)")
            s = r.shape(wname)
            if s != (o, i):
                raise CheckpointError(
                    f"module {name!r}: {r.label} tensor {wname!r} in {r.file_of(wname)} has shape {list(s)}, "
                    f"the LRM's module is [out, in] = {[o, i]}")
        if merge_bias:
            bname = name + ".bias"
            has = [bname in r for r in (itm, base)]
            if has[0] != has[1]:
                which = itm if has[0] else base
                raise CheckpointError(f"module {name!r}: --merge-bias but only the {which.label} has {bname!r}")
            if has[0] and not _lrm_has_bias:
                raise CheckpointError(
                    f"module {name!r}: --merge-bias but the LRM's module has no bias (the ITM's {bname!r} "
                    "cannot be attached)")
            if has[0]:
                for r in (itm, base):
                    s = r.shape(bname)
                    if s != (o,):
                        raise CheckpointError(
                            f"module {name!r}: {r.label} tensor {bname!r} in {r.file_of(bname)} has shape "
                            f"{list(s)}, expected [{o}]")


def task_vector(itm: CheckpointReader, base: CheckpointReader, name: str, *, merge_bias: bool = False,
                dtype: torch.dtype = torch.float32) -> ModuleDelta:
    """Δ_I = W_I − W_B for module ``name`` (``[out, in]``, ``dtype``); with ``merge_bias`` and both
    checkpoints holding a bias, also b_I − b_B (``[out]``). Loads exactly 2 (or 4) tensors."""
    wname = name + ".weight"
    d = itm.get(wname, dtype)
    d.sub_(base.get(wname, dtype))
    bias = None
    if merge_bias and (name + ".bias") in itm and (name + ".bias") in base:
        bias = itm.get(name + ".bias", dtype) - base.get(name + ".bias", dtype)
    return ModuleDelta(delta=d, bias=bias)


def iter_task_vectors(itm, base, expected: Mapping[str, tuple[tuple[int, int], bool]], *,
                      merge_bias: bool = False, dtype: torch.dtype = torch.float32, check: bool = True
                      ) -> Iterator[tuple[str, ModuleDelta]]:
    """Yield ``(module, ModuleDelta)`` one module at a time (only one Δ alive per step, unless the
    caller keeps them). ``itm`` / ``base`` are paths, Hub ids or :class:`CheckpointReader`s."""
    itm = _as_reader(itm, "ITM")
    base = _as_reader(base, "base")
    if check:
        check_task_vector(itm, base, expected, merge_bias=merge_bias)
    for name in expected:
        yield name, task_vector(itm, base, name, merge_bias=merge_bias, dtype=dtype)
