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

Every entry records the key of the build that made it and is checked against the reader's
(:mod:`.cache_trust`): ``meta.json`` must name its directory and this key (else the directory was
renamed or copied: its entries are dropped, with a warning); each layer file and sidecar record
the key and layer (an entry copied from another build's cache, e.g. another calibration set, is
a warning naming it, and is recomputed); an entry reached through a symlink is never read (a
linked key directory is left alone and not used; a linked file is unlinked and recomputed).

The key leaves out the module set and the projected layers (checked per layer instead), so a
``--project-layers 0-1`` build reuses the layers of an all-layers build. A write that fails (a full
or read-only disk) is one warning line (``store.disk_errors``) and the build goes on without
saving; the cache is never needed for a correct result.

Stage 2's attention statistics (``coefficients.stage2_statistics``) are kept next to the features
by :class:`Stage2StatsCache` under ``DIR/<key>/stage2/<stats key>``, keyed on
:func:`stage2_settings`: everything they depend on and none of ρ, α_max, ``alpha_norm``,
``o_alpha``, so a rebuild changing only those runs no attention pass.
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
from .cache_trust import clear_entries, first_link, link_problem, meta_problem, settings_diff, unlink_quietly
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

    def ours(self, quiet: bool = False) -> bool:
        """Whether ``dir`` may be used: absent, empty, or carrying our marker, not a symlink, and its
        ``meta.json`` (if any) names this key (else a warning, unless ``quiet``; a directory of ours
        whose ``meta.json`` names another key, or none, is emptied of our entries first)."""
        d = self.dir
        if d.is_symlink():
            if not quiet:
                self.warn(f"feature cache: {link_problem(d)}, so it is left alone and not used; remove the "
                          "link to use this cache")
            return False
        if not d.exists() or (d.is_dir() and not any(d.iterdir())):
            return True
        if not store.has_marker(d):
            if not quiet:
                self.warn(f"feature cache: {d} exists but was not created by rain build (no {store.MARKER_NAME} "
                          "marker): it is left alone and not used; move it away to use this cache")
            return False
        entries = any(d.glob("layer_*")) or (d / STAGE2_DIR).exists()
        problem = meta_problem(d, self.key, self.settings, entries)
        if problem is not None:
            self.warn(f"feature cache: {problem}; its entries are not used and are recomputed")
            clear_entries(d, STAGE2_DIR)
        return True

    def open(self, what: str = "its features") -> bool:
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
            self._write_failed(e, what)
            return False
        now = time.time()
        for tmp in self.dir.glob(".*.tmp"):
            try:
                if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:  # another build may be writing a young one
                    tmp.unlink()
            except OSError:
                pass
        return True

    def _write_failed(self, e: OSError, what: str = "its features") -> None:
        self.writable = False
        self.warn(f"feature cache: could not write {e.filename or self.dir} ({e.strerror or e}); the build "
                  f"goes on without saving {what}")

    def _drop(self, layer: int) -> None:
        unlink_quietly((self._sidecar(layer), self.layer_path(layer)))

    def check_layer(self, layer: int, names: Sequence[str], fingerprint: dict[str, Any]) -> bool:
        """Whether ``layer`` can serve ``names``: neither its file nor its sidecar is a symlink, the
        sidecar exists and matches, both record this cache's key and ``layer``, the file holds every
        name and their fingerprints are ``fingerprint``'s. A corrupt, foreign or mismatching layer
        is warned about (naming the file) and dropped, so it is recomputed."""
        path, side = self.layer_path(layer), self._sidecar(layer)
        if not side.is_file() and not side.is_symlink() and not path.is_symlink():
            return False
        problem = None
        try:
            link = first_link((path, side))
            sums = None if link else json.loads(side.read_text())
            if link is not None:
                problem = link_problem(link)
            elif not side.is_file():
                return False
            elif not path.is_file():
                problem = f"{path} is missing"
            elif file_sha256(path) != sums.get("sha256"):
                problem = f"{path} does not match its checksum (corrupt or truncated)"
            else:
                meta = _layer_meta(path)
                if meta.get("key") != self.key or sums.get("key") != self.key:
                    problem = (f"{path} was made by another build (key {meta.get('key')}, this build's is "
                               f"{self.key}{settings_diff(meta.get('settings'), self.settings)})")
                elif meta.get("layer") != layer or sums.get("file") != path.name:
                    problem = f"{path} holds layer {meta.get('layer')} (swapped with another layer's file)"
                elif any(n not in meta["modules"] for n in names):
                    return False  # made with fewer modules: a miss, not a fault
                elif any(meta.get("fingerprint", {}).get(n) != fingerprint.get(n) for n in names):
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
        meta = {"key": self.key, "settings": self.settings, "layer": layer, "modules": modules,
                "fingerprint": {n: fingerprint.get(n) for n in names}}
        path, side = self.layer_path(layer), self._sidecar(layer)
        tag = uuid.uuid4().hex[:8]
        tmps = (self.dir / f".{path.name}.{tag}.tmp", self.dir / f".{side.name}.{tag}.tmp")
        try:
            side.unlink(missing_ok=True)  # a stale sidecar must never vouch for the new file
            with store.disk_errors(tmps[0]):
                save_file(tensors, str(tmps[0]), metadata={META_KEY: json.dumps(meta)})
            with store.disk_errors(tmps[1]):
                tmps[1].write_text(json.dumps({"file": path.name, "sha256": file_sha256(tmps[0]), "key": self.key}))
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


# ---- Stage 2's attention statistics ----------------------------------------------------------------
STAGE2_DIR = "stage2"


def instruction_digest(source: Any) -> str:
    """16 hex of sha256 of the instruction calibration: a file's bytes, or the records as sorted JSON."""
    from .spans import default_instruction_calib_path

    if source is None or isinstance(source, (str, Path)):
        return file_sha256(Path(source if source is not None else default_instruction_calib_path()).expanduser())[:16]
    return hashlib.sha256(json.dumps(list(source), sort_keys=True, default=str).encode()).hexdigest()[:16]


def deltas_digest(deltas: dict[str, Any]) -> str:
    """16 hex of sha256 of the Stage 1 deltas' names, shapes and :func:`weight_sample` values (a few
    reads per module): an ITM / base rewritten in place changes it."""
    from ..format.fingerprint import weight_sample

    h = hashlib.sha256()
    for name, md in deltas.items():
        h.update(name.encode())
        for t in (md.delta, md.lora_A, md.lora_B, md.bias):
            if t is None:
                h.update(b"-")
                continue
            h.update(repr(tuple(t.shape)).encode())
            if t.numel():
                h.update(weight_sample(t.reshape(1, -1) if t.ndim < 2 else t.flatten(1)).numpy().tobytes())
    return h.hexdigest()[:16]


def stage2_settings(opts: Any, stage1: dict[str, Any], feature_key: str | None, tokenizer: Any,
                    deltas: dict[str, Any], limits: tuple[int | None, int]) -> dict[str, Any]:
    """Everything Stage 2's statistics depend on and none of ρ / α_max / alpha_norm / o_alpha:
    ``stage1`` (``pipeline.cache_settings``, the resume key) and a digest of the deltas, the
    features' key, the instruction set (a digest; ``limits`` = Stage 2's max samples and
    max sequence length), the tokenizer (size, chat template), ``alpha_grad``, dtype, device,
    torch / transformers versions."""
    import transformers  # lazy, as everywhere in build

    template = getattr(tokenizer, "chat_template", None)
    return {
        "stage1": stage1, "deltas": deltas_digest(deltas), "feature_key": feature_key,
        "instruction": instruction_digest(opts.instruction_calib),
        "max_samples": limits[0], "max_seq_len": limits[1], "vocab": len(tokenizer),
        "chat_template": None if template is None else hashlib.sha256(str(template).encode()).hexdigest()[:16],
        "alpha_grad": opts.alpha_grad, "dtype": opts.dtype, "device": None if opts.device is None else str(opts.device),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }


class Stage2StatsCache:
    """Stage 2's attention statistics (``coefficients.stage2_statistics``) under
    ``<features dir>/stage2/<key>``: ``.safetensors`` (the ``[L, H]`` float64 means), ``.json``
    (``{"key", "settings", "stats"}``: the counts and the span report) and ``.sha256`` (both files'
    sha256, renamed into place last). The ``stats_cache`` hook of ``coefficients.run_stage2``."""

    def __init__(self, features: FeatureCache, settings: dict[str, Any],
                 log: Callable[[str], None] | None = None) -> None:
        self.fc = features
        self.settings = settings
        self.key = settings_key(settings)
        self.dir = features.dir / STAGE2_DIR
        self._log = log or (lambda msg: None)
        self.usable = True

    def files(self) -> tuple[Path, Path, Path]:
        """(tensors, json, checksum sidecar)."""
        return tuple(self.dir / f"{self.key}.{ext}" for ext in ("safetensors", "json", "sha256"))  # type: ignore[return-value]

    def _drop(self) -> None:
        # a linked stage2 directory: the link only, never what it points to
        unlink_quietly([self.dir] if self.dir.is_symlink() else self.files()[::-1])

    def _read(self) -> dict[str, Any]:
        tensors, meta_p, side = self.files()
        link = first_link((self.dir, *self.files()))
        if link is not None:
            raise ValueError(link_problem(link))
        sums = json.loads(side.read_text())
        for p in (tensors, meta_p):
            if file_sha256(p) != sums.get(p.name):
                raise ValueError(f"{p} does not match its checksum (corrupt or truncated)")
        meta = json.loads(meta_p.read_text())
        if (meta.get("key") != self.key or not isinstance(meta.get("settings"), dict)
                or settings_key(meta["settings"]) != self.key or not isinstance(meta.get("stats"), dict)):
            raise ValueError(f"{meta_p} holds another build's statistics (key {meta.get('key')}, this build's is "
                             f"{self.key}{settings_diff(meta.get('settings'), self.settings)}; renamed or copied)")
        with safe_open(str(tensors), framework="pt") as f:
            stats = {**meta["stats"], **{k: f.get_tensor(k) for k in f.keys()}}
        want = ("a1", "u1", "a0", "u0") if self.settings.get("alpha_grad") == "gain" else ("a1", "u1")
        if any(k not in stats for k in (*want, "n_a", "n_u", "n_a_positive", "samples")):
            raise KeyError("a statistic is missing")
        return stats

    def load(self) -> dict[str, Any] | None:
        """The cached statistics, or None (a miss; a corrupt entry is warned about and dropped)."""
        where = f"{self.dir} (key {self.key})"
        self.usable = self.fc.ours(quiet=True)
        if not self.usable or not (self.files()[2].is_file() or first_link((self.dir, *self.files()))):
            self._log(f"[rain build] stage2: attention statistics not in the feature cache {where}; running the passes")
            return None
        try:
            stats = self._read()
        except (OSError, ValueError, TypeError, KeyError, AttributeError, SafetensorError) as e:
            self.fc.warn(f"feature cache: Stage 2 statistics {self.files()[0]} unusable ({e}); they are recomputed "
                         f"(to clear the cache: rm -r {self.fc.dir})")
            self._drop()
            return None
        self._log(f"[rain build] stage2: attention statistics from the feature cache {where}; no attention pass")
        return stats

    def save(self, stats: dict[str, Any]) -> None:
        """Write ``stats`` (sidecar last); a failed write warns once and the build goes on."""
        if not self.usable or not self.fc.writable or not self.fc.open("its Stage 2 statistics"):
            return
        files = self.files()
        tag = uuid.uuid4().hex[:8]
        tmps = tuple(self.dir / f".{p.name}.{tag}.tmp" for p in files)
        try:
            files[2].unlink(missing_ok=True)  # a stale sidecar must never vouch for new files
            with store.disk_errors(self.dir):
                self.dir.mkdir(exist_ok=True)
            with store.disk_errors(tmps[0]):
                save_file({k: v.contiguous() for k, v in stats.items() if isinstance(v, Tensor)}, str(tmps[0]))
            with store.disk_errors(tmps[1]):
                rest = {k: v for k, v in stats.items() if not isinstance(v, Tensor)}
                tmps[1].write_text(json.dumps({"key": self.key, "settings": self.settings, "stats": rest}, indent=1))
                tmps[2].write_text(json.dumps({files[0].name: file_sha256(tmps[0]), files[1].name: file_sha256(tmps[1])}))
                for tmp, p in zip(tmps, files):
                    os.replace(tmp, p)
        except OSError as e:
            self.fc._write_failed(e, "its Stage 2 statistics")
            return
        finally:
            for tmp in tmps:
                tmp.unlink(missing_ok=True)
        self._log(f"[rain build] stage2: attention statistics saved to the feature cache {self.dir} (key {self.key})")
