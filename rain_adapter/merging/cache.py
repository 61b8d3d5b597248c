"""The per-layer partial cache of ``rain build``: ``<out>.partial/``, so ``--resume`` continues.

Layout: ``.rain-partial`` (the marker: the directory was made by this library, so it may be
deleted; ``store.MARKER_NAME``), ``meta.json`` = ``{"key", "settings"}`` (key = first 16 hex of
sha256 of the settings JSON, sorted keys), then per finished layer ``l`` the files
``layer_<l>.safetensors`` (``<module>.delta`` [out, in], ``<module>.bias`` [out]),
``layer_<l>.json`` (the per-module stats) and ``layer_<l>.sha256`` (the sha256 of those two). The
sidecar is renamed into place last, so a layer counts as done only when it exists and both
checksums match; ``--resume`` verifies every cached layer and recomputes a corrupt one.
A cache whose key differs from the current settings is never reused, and an ``<out>.partial``
without the marker, or that is a symlink, is never touched (the build stops and says so).

Each sidecar also records the key and the layer of the build that wrote it, and ``--resume``
checks them against its own (and ``meta.json``'s settings against its key): a layer copied in from
another build's cache (other settings, another calibration set), one swapped with another layer's
files, or one whose file or sidecar is a symlink is reported naming the file and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..format import store
from ..format.delta import ModuleDelta
from .options import BuildError

PARTIAL_SUFFIX = ".partial"
_LAYER_RE = re.compile(r"layer_(\d+)\.(safetensors|json|sha256)$")


class CacheError(BuildError):
    """A cached layer is unreadable or fails its checksum; the message names the file and how to
    clear the cache."""


def partial_dir(out: Path) -> Path:
    """``<out>.partial``: the cache next to the output directory."""
    return Path(str(out) + PARTIAL_SUFFIX)


def check_partial(out: Path) -> None:
    """Refuse (FileExistsError) an ``<out>.partial`` this library did not create: it holds files but
    no marker. It is left alone; called before anything is loaded."""
    d = partial_dir(out)
    if d.is_symlink():
        raise FileExistsError(f"{d} is a symlink (to {os.path.realpath(d)}): a layer cache reached through a link "
                              "may be another build's, so it is left alone: remove the link and run again")
    if d.exists() and not store.has_marker(d) and (not d.is_dir() or any(d.iterdir())):
        raise FileExistsError(f"{d} exists but was not created by rain build (no {store.MARKER_NAME} "
                              f"marker), so it is left alone: move it away (or choose another --out) and run again")


def settings_key(settings: dict[str, Any]) -> str:
    """16 hex chars identifying the settings (any change → a different key → no reuse)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _companions(path: Path) -> tuple[Path, Path]:
    """(stats json, checksum sidecar) of the layer file ``path``."""
    return path.with_suffix(".json"), path.with_suffix(".sha256")


def _layer_of(path: Path) -> int | None:
    m = _LAYER_RE.match(path.name)
    return int(m.group(1)) if m else None


def save_layer(path: Path, deltas: dict[str, ModuleDelta], stats: dict[str, dict], key: str | None = None) -> None:
    """Atomically write one finished layer of the partial cache: safetensors + stats json, then the
    sidecar with both checksums, ``key`` (the build's settings key) and the layer (last, so it
    marks the layer done). A failure (a full disk) leaves no temporary file and raises an OSError
    naming the file."""
    flat = {}
    for n, d in deltas.items():
        flat[n + ".delta"] = d.delta.contiguous()
        if d.bias is not None:
            flat[n + ".bias"] = d.bias.contiguous()
    js, side = _companions(path)
    tmps = [path.with_suffix(".tmp"), path.with_suffix(".json.tmp"), path.with_suffix(".sha256.tmp")]
    try:
        side.unlink(missing_ok=True)  # a stale sidecar must never vouch for the new files
        with store.disk_errors(tmps[0]):
            save_file(flat, str(tmps[0]))
        tmps[1].write_text(json.dumps(stats))
        tmps[2].write_text(json.dumps({path.name: file_sha256(tmps[0]), js.name: file_sha256(tmps[1]),
                                       "key": key, "layer": _layer_of(path)}))
        for tmp, final in zip(tmps, (path, js, side)):
            os.replace(tmp, final)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise


def layer_problem(path: Path, key: str | None = None) -> str | None:
    """What is wrong with the cached layer ``path``, naming the file at fault (None: its files
    exist, none is a symlink, they match the checksums of its sidecar, and with ``key`` the
    sidecar names that key and this layer)."""
    js, side = _companions(path)
    link = next((f for f in (path, js, side) if f.is_symlink()), None)
    if link is not None:
        return f"{link} is a symlink (to {os.path.realpath(link)}): an entry reached through a link may be another build's"
    try:
        sums = json.loads(side.read_text())
    except FileNotFoundError:
        return f"{side} is missing (no checksums for {path.name})"
    except (OSError, ValueError):
        sums = None
    if not isinstance(sums, dict):
        return f"{side} is unreadable (no checksums for {path.name})"
    for f in (path, js):
        if not f.is_file():
            return f"{f} is missing"
        if file_sha256(f) != sums.get(f.name):
            return f"{f} does not match its checksum (corrupt or truncated)"
    if key is not None and sums.get("key") != key:
        return f"{path} was made by another build (key {sums.get('key')}, this build's is {key})"
    if key is not None and sums.get("layer") != _layer_of(path):
        return f"{path} holds layer {sums.get('layer')} (swapped with another layer's files)"
    return None


def load_layer(path: Path) -> tuple[dict[str, ModuleDelta], dict[str, dict]]:
    """One cached layer, verified against its checksums first (:class:`CacheError` naming the file
    otherwise). ``load_file`` memory-maps the file (safetensors ≥ 0.4): the tensors are
    copy-on-write views of the page cache, so holding every layer until the final write costs
    reclaimable file pages, not anonymous memory."""
    problem = layer_problem(path)
    try:
        flat = {} if problem else load_file(str(path))
        stats = {} if problem else json.loads(_companions(path)[0].read_text())
    except (SafetensorError, OSError, ValueError) as e:
        problem = f"{path} is unreadable ({e})"
    if problem:
        raise CacheError(f"layer cache: {problem}; run again with --resume to recompute that layer, "
                         f"or clear the cache: rm -r {path.parent}")
    out = {}
    for k in flat:
        if k.endswith(".delta"):
            n = k[: -len(".delta")]
            out[n] = ModuleDelta(delta=flat[k], bias=flat.get(n + ".bias"))
    return out, stats


class PartialCache:
    """``<out>.partial/`` for one build: which layers are done, where each layer goes, cleanup
    (only ever of a directory carrying the marker)."""

    def __init__(self, out: Path) -> None:
        self.out, self.dir = out, partial_dir(out)
        self.created = False  # this build made the directory (so a failure may remove it)
        self.key: str | None = None  # the settings key, once :meth:`open` ran

    def save_layer(self, layer: int, deltas: dict[str, ModuleDelta], stats: dict[str, dict]) -> None:
        """:func:`save_layer` of ``layer`` under this cache's key."""
        save_layer(self.layer_path(layer), deltas, stats, key=self.key)

    def layer_path(self, layer: int) -> Path:
        return self.dir / f"layer_{layer}.safetensors"

    def _key(self) -> str | None:
        """``meta.json``'s key, when it is a file (not a link) whose settings hash to it."""
        meta = self.dir / "meta.json"
        try:
            m = json.loads(meta.read_text())
            key = m.get("key")
            ok = not meta.is_symlink() and isinstance(m.get("settings"), dict) and settings_key(m["settings"]) == key
            return key if ok else None
        except (OSError, ValueError, AttributeError, TypeError):
            return None

    def verified_layers(self, log: Callable[[str], None]) -> set[int]:
        """The cached layers whose files match their checksums and whose sidecars name this cache's
        key and their layer (none a symlink). Each other layer is reported
        (file, problem, the command that clears the cache), its files dropped, so it is recomputed;
        leftover temporary files of an interrupted write are dropped silently."""
        for tmp in self.dir.glob("layer_*.tmp"):
            tmp.unlink(missing_ok=True)
        layers = {int(m.group(1)) for p in self.dir.glob("layer_*") if (m := _LAYER_RE.match(p.name))}
        done = set()
        for layer in sorted(layers):
            path = self.layer_path(layer)
            problem = layer_problem(path, self.key)
            if problem is None:
                done.add(layer)
                continue
            log(f"[rain build] layer cache: {problem}; layer {layer} will be recomputed "
                f"(to clear the whole cache: rm -r {self.dir})")
            for f in (path, *_companions(path)):
                f.unlink(missing_ok=True)
        return done

    def open(self, settings: dict[str, Any], *, resume: bool, log: Callable[[str], None]) -> set[int]:
        """Prepare the cache for ``settings``; returns the layers already done (only with
        ``resume``, a matching key and matching checksums). Any other existing cache of ours is
        removed; one without the marker is refused (:func:`check_partial`), never deleted."""
        key = self.key = settings_key(settings)
        done: set[int] = set()
        check_partial(self.out)
        if store.has_marker(self.dir):
            if resume and self._key() == key:
                done = self.verified_layers(log)
                log(f"[rain build] resuming: {len(done)} layer(s) cached in {self.dir}")
            else:
                if resume:
                    log(f"[rain build] {self.dir} was made with other settings; starting over")
                store.remove_ours(self.dir)
        self.created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        store.write_marker(self.dir, "partial-cache")
        (self.dir / "meta.json").write_text(json.dumps({"key": key, "settings": settings}, indent=1))
        return done

    def discard_if_empty(self) -> None:
        """After a failure: remove a cache this build created and that holds no finished layer
        (so bad inputs leave nothing behind, while finished layers stay for ``--resume``)."""
        if self.created and not any(self.dir.glob("layer_*.sha256")):
            store.remove_ours(self.dir)

    def remove(self) -> None:
        """After the adapter is written: the cache is not needed any more (removed only if ours)."""
        store.remove_ours(self.dir)
