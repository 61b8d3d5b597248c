"""The per-layer partial cache of ``rain build``: ``<out>.partial/``, so ``--resume`` continues.

Layout: ``meta.json`` = ``{"key", "settings"}`` (key = first 16 hex of sha256 of the settings JSON,
sorted keys), then per finished layer ``l`` the pair ``layer_<l>.safetensors`` (``<module>.delta``
[out, in], ``<module>.bias`` [out]) + ``layer_<l>.json`` (the per-module stats). The json is
written first and both are renamed into place, so a layer counts as done only when both exist.
A cache whose key differs from the current settings is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ..format.delta import ModuleDelta

PARTIAL_SUFFIX = ".partial"


def partial_dir(out: Path) -> Path:
    """``<out>.partial``: the cache next to the output directory."""
    return Path(str(out) + PARTIAL_SUFFIX)


def settings_key(settings: dict[str, Any]) -> str:
    """16 hex chars identifying the settings (any change → a different key → no reuse)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def save_layer(path: Path, deltas: dict[str, ModuleDelta], stats: dict[str, dict]) -> None:
    """Atomically write one finished layer of the partial cache (safetensors + json)."""
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


def load_layer(path: Path) -> tuple[dict[str, ModuleDelta], dict[str, dict]]:
    """One cached layer. ``load_file`` memory-maps the file (safetensors ≥ 0.4): the tensors are
    copy-on-write views of the page cache, so holding every layer until the final write costs
    reclaimable file pages, not anonymous memory."""
    flat = load_file(str(path))
    stats = json.loads(path.with_suffix(".json").read_text())
    out = {}
    for k in flat:
        if k.endswith(".delta"):
            n = k[: -len(".delta")]
            out[n] = ModuleDelta(delta=flat[k], bias=flat.get(n + ".bias"))
    return out, stats


class PartialCache:
    """``<out>.partial/`` for one build: which layers are done, where each layer goes, cleanup."""

    def __init__(self, out: Path) -> None:
        self.dir = partial_dir(out)
        self.created = False  # this build made the directory (so a failure may remove it)

    def layer_path(self, layer: int) -> Path:
        return self.dir / f"layer_{layer}.safetensors"

    def open(self, settings: dict[str, Any], *, resume: bool, log: Callable[[str], None]) -> set[int]:
        """Prepare the cache for ``settings``; returns the layers already done (only with
        ``resume`` and a matching key; any other existing cache is removed)."""
        key = settings_key(settings)
        done: set[int] = set()
        if self.dir.exists():
            meta_f = self.dir / "meta.json"
            same = meta_f.is_file() and json.loads(meta_f.read_text()).get("key") == key
            if resume and same:
                done = {int(p.stem.split("_")[1]) for p in self.dir.glob("layer_*.safetensors")
                        if p.with_suffix(".json").is_file()}
                log(f"[rain build] resuming: {len(done)} layer(s) cached in {self.dir}")
            else:
                if resume:
                    log(f"[rain build] {self.dir} was made with other settings; starting over")
                shutil.rmtree(self.dir)
        self.created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "meta.json").write_text(json.dumps({"key": key, "settings": settings}, indent=1))
        return done

    def discard_if_empty(self) -> None:
        """After a failure: remove a cache this build created and that holds no finished layer
        (so bad inputs leave nothing behind, while finished layers stay for ``--resume``)."""
        if self.created and not any(self.dir.glob("layer_*.safetensors")):
            shutil.rmtree(self.dir, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
