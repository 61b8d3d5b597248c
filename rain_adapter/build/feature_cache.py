"""The opt-in Stage 1 feature cache (``--feature-cache DIR``, docs/DESIGN.md §5.7).

A second build of the same LRM + calibration set that changes only what is done *with* the
features (``--projection``, ``--protect-energy``, ``--ridge``, ``--project-layers``, Stage 2, the
storage) reads the features X from disk instead of running the calibration forward again.

Layout under ``DIR/<key>/`` (key = first 16 hex of sha256 of :func:`feature_settings`, JSON with
sorted keys): ``.rain-partial`` (``store.write_marker``, kind ``"feature-cache"``: the directory is
ours, so its files may be replaced), ``meta.json`` = ``{"key", "settings"}``, and per layer ``l``
``layer_<l>.safetensors`` + ``layer_<l>.sha256``. A layer file holds each distinct input once
(modules reading the same tensor, q/k/v or gate/up, share it: the tensor is stored under the
first such module's name) in the dtype it was captured in (float32); its safetensors metadata
``rain_features`` maps every module name to its tensor and records the module's LRM fingerprint
(``Targets.fingerprint``). The sidecar holds the file's sha256 and is renamed into place last: a
layer counts only when the sidecar exists and matches, when it holds every module asked for and
their fingerprints are the loaded LRM's. A corrupt layer, or one whose fingerprints differ, is a
:class:`FeatureCacheWarning` naming the file, and is recomputed (and rewritten).

The key leaves out the module set and the projected layers (checked per layer instead), so a
``--project-layers 0-1`` build reuses the layers of an all-layers build. A write that fails (a full
or read-only disk) is one warning line (``store.disk_errors``) and the build goes on without
saving; the cache is never needed for a correct result.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..format import store
from ..format.fingerprint import fingerprint_record
from .cache import CacheError, file_sha256, settings_key
from .calibration import CalibrationSet
from .errors import BuildWarning

KIND = "feature-cache"
META_KEY = "rain_features"
#: a leftover ``*.tmp`` of an interrupted write older than this is removed when the cache is opened
STALE_TMP_SECONDS = 24 * 3600

Features = dict[str, Tensor]
Compute = Callable[[list[int]], Iterator[tuple[int, Features]]]


class FeatureCacheWarning(BuildWarning):
    """A feature-cache layer that could not be used (corrupt, another LRM's weights) or written."""


def _tokens_digest(calib: CalibrationSet) -> str:
    """sha256 of the token ids and Ω positions of every calibration item, in order: exactly the
    inputs the forward sees (a changed tokenizer changes it too)."""
    h = hashlib.sha256()
    for it in calib.items:
        for seq in (it.input_ids, it.positions):
            h.update(torch.tensor(seq, dtype=torch.int64).numpy().tobytes())
            h.update(b"|")
    return h.hexdigest()[:16]


def feature_settings(opts: Any, calib: CalibrationSet, model: nn.Module | None) -> dict[str, Any]:
    """Everything the features depend on (``opts``: BuildOptions): the LRM (path, dtype, and a
    fingerprint of its input embedding: per-module fingerprints are checked per layer), the
    calibration (hash, the settings that select and cut it, and a digest of the token ids and
    positions), and the forward settings that can change the last bits (batch size, sequential,
    device, torch / transformers versions). Not the modules, projected layers or projection."""
    import transformers  # lazy, as everywhere in build

    emb = getattr(model, "get_input_embeddings", lambda: None)() if model is not None else None
    lrm = Path(str(opts.lrm)).expanduser()
    return {
        "lrm": str(lrm.resolve()) if lrm.exists() else str(opts.lrm), "dtype": opts.dtype,
        "lrm_embedding": fingerprint_record(emb.weight) if emb is not None else None,
        "calib_hash": calib.info.get("calib_hash"), "calib_tokens": _tokens_digest(calib),
        "radius": opts.radius, "max_samples": opts.max_samples, "min_samples": opts.min_samples,
        "max_seq_len": opts.max_seq_len, "batch_size": opts.batch_size, "sequential": opts.sequential,
        "device": None if opts.device is None else str(opts.device),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }


def _layer_meta(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})[META_KEY])
    if not isinstance(meta, dict) or not isinstance(meta.get("modules"), dict):
        raise TypeError(f"malformed {META_KEY} record")
    return meta


class FeatureCache:
    """``root/<key>/`` for one LRM + calibration + forward settings; see the module docstring.

    ``warn(msg, category)``: where warnings go (``BuildLog.warn``; default ``warnings.warn``)."""

    def __init__(self, root: str | Path, settings: dict[str, Any],
                 warn: Callable[..., None] | None = None) -> None:
        self.root = Path(root).expanduser()
        self.settings = settings
        self.key = settings_key(settings)
        self.dir = self.root / self.key
        self._warn = warn
        self.writable = True  # False after a failed write: the build goes on without saving

    def warn(self, msg: str) -> None:
        if self._warn is not None:
            self._warn(msg, FeatureCacheWarning)
        else:
            import warnings

            warnings.warn(msg, FeatureCacheWarning, stacklevel=3)

    def layer_path(self, layer: int) -> Path:
        return self.dir / f"layer_{layer}.safetensors"

    def _sidecar(self, layer: int) -> Path:
        return self.dir / f"layer_{layer}.sha256"

    def ours(self) -> bool:
        """Whether ``dir`` may be used: absent, empty, or carrying our marker (else a warning)."""
        d = self.dir
        if not d.exists() or store.has_marker(d) or (d.is_dir() and not any(d.iterdir())):
            return True
        self.warn(f"feature cache: {d} exists but was not created by rain build (no {store.MARKER_NAME} "
                  "marker): it is left alone and not used; move it away to use this cache")
        return False

    def open(self) -> bool:
        """Create ``dir`` (marker, ``meta.json``) for writing; False (with a warning) when it cannot be."""
        try:
            with store.disk_errors(self.dir):
                self.dir.mkdir(parents=True, exist_ok=True)
                store.write_marker(self.dir, KIND)
                meta = self.dir / "meta.json"
                if not meta.is_file():
                    tmp = self.dir / f".meta.{uuid.uuid4().hex[:8]}.tmp"
                    tmp.write_text(json.dumps({"key": self.key, "settings": self.settings}, indent=1))
                    os.replace(tmp, meta)
        except OSError as e:
            self._write_failed(e)
            return False
        now = time.time()
        for tmp in self.dir.glob(".*.tmp"):
            try:
                if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:  # another build may be writing a young one
                    tmp.unlink()
            except OSError:
                pass
        return True

    def _write_failed(self, e: OSError) -> None:
        self.writable = False
        self.warn(f"feature cache: could not write {e.filename or self.dir} ({e.strerror or e}); the build "
                  "goes on without saving its features")

    def _drop(self, layer: int) -> None:
        for f in (self._sidecar(layer), self.layer_path(layer)):
            try:
                f.unlink(missing_ok=True)
            except OSError:
                pass

    def check_layer(self, layer: int, names: Sequence[str], fingerprint: dict[str, Any]) -> bool:
        """Whether ``layer`` can serve ``names``: the sidecar exists and matches, the file holds
        every name, their fingerprints are ``fingerprint``'s. A corrupt or mismatching layer is
        warned about (naming the file) and dropped, so it is recomputed."""
        path, side = self.layer_path(layer), self._sidecar(layer)
        if not side.is_file():
            return False
        problem = None
        try:
            sums = json.loads(side.read_text())
            if not path.is_file():
                problem = f"{path} is missing"
            elif file_sha256(path) != sums.get("sha256"):
                problem = f"{path} does not match its checksum (corrupt or truncated)"
            else:
                meta = _layer_meta(path)
                if any(n not in meta["modules"] for n in names):
                    return False  # made with fewer modules: a miss, not a fault
                if any(meta.get("fingerprint", {}).get(n) != fingerprint.get(n) for n in names):
                    problem = f"{path} was made from other LRM weights (fingerprint differs)"
        except (OSError, ValueError, TypeError, KeyError, AttributeError, SafetensorError) as e:
            problem = f"{path} is unreadable ({e})"
        if problem is None:
            return True
        self.warn(f"feature cache: {problem}; layer {layer} is recomputed (to clear the cache: rm -r {self.dir})")
        self._drop(layer)
        return False

    def load(self, layer: int, names: Sequence[str]) -> Features:
        """``{name: X}`` of ``layer`` (checked by :meth:`check_layer`), memory-mapped; modules that
        share an input share one tensor, as in ``features.iter_layer_features``."""
        path = self.layer_path(layer)
        try:
            modules = _layer_meta(path)["modules"]
            with safe_open(str(path), framework="pt") as f:
                xs = {k: f.get_tensor(k) for k in dict.fromkeys(modules[n] for n in names)}
        except (OSError, ValueError, TypeError, KeyError, SafetensorError) as e:
            raise CacheError(f"feature cache: {path} is unreadable ({e}); clear the cache: rm -r {self.dir}") from e
        return {n: xs[modules[n]] for n in names}

    def save(self, layer: int, feats: Features, names: Sequence[str], fingerprint: dict[str, Any]) -> None:
        """Write ``layer``'s features (each distinct tensor once), then its sidecar (last). A
        failed write leaves no temporary file, warns once and turns saving off."""
        if not self.writable:
            return
        tensors: dict[str, Tensor] = {}
        modules: dict[str, str] = {}
        first: dict[tuple, str] = {}
        for n in names:
            x = feats[n]
            k = modules[n] = first.setdefault((x.data_ptr() or id(x), tuple(x.shape), x.dtype), n)
            if k == n:
                tensors[n] = x.contiguous()
        meta = {"layer": layer, "modules": modules, "fingerprint": {n: fingerprint.get(n) for n in names}}
        path, side = self.layer_path(layer), self._sidecar(layer)
        tag = uuid.uuid4().hex[:8]
        tmps = (self.dir / f".{path.name}.{tag}.tmp", self.dir / f".{side.name}.{tag}.tmp")
        try:
            side.unlink(missing_ok=True)  # a stale sidecar must never vouch for the new file
            with store.disk_errors(tmps[0]):
                save_file(tensors, str(tmps[0]), metadata={META_KEY: json.dumps(meta)})
            with store.disk_errors(tmps[1]):
                tmps[1].write_text(json.dumps({"file": path.name, "sha256": file_sha256(tmps[0])}))
                os.replace(tmps[0], path)
                os.replace(tmps[1], side)
        except OSError as e:
            self._write_failed(e)
        finally:
            for tmp in tmps:
                tmp.unlink(missing_ok=True)

    def layers(self, layers: Sequence[int], by_layer: dict[int, list[str]], fingerprint: dict[str, Any],
               compute: Compute, log: Callable[[str], None]) -> Iterator[tuple[int, Features]]:
        """``(layer, {name: X})`` for every layer in ``layers``: the cached ones from disk, then
        the others from ``compute(missing layers)`` (the forward), each saved as it arrives."""
        usable = self.ours()
        hits = [l for l in layers if usable and self.check_layer(l, by_layer[l], fingerprint)]
        missing = [l for l in layers if l not in hits]
        if missing and usable:
            usable = self.open()
        where = f"{self.dir} (key {self.key})"
        if not missing:
            log(f"[rain build] features: all {len(hits)} layer(s) from the feature cache {where}; no forward")
        else:
            saved = "saved to" if usable else "not saved to"
            log(f"[rain build] features: {len(hits)} layer(s) from the feature cache, {len(missing)} computed "
                f"and {saved} {where}")
        for l in hits:
            yield l, self.load(l, by_layer[l])
        if not missing:
            return
        for l, feats in compute(missing):
            if usable:
                self.save(l, feats, by_layer[l], fingerprint)
            yield l, feats
