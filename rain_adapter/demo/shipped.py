"""The toy worlds that ship with the package: trained once, hashed, copied into the cache on use.

Why: world training is deterministic on one machine (fixed seeds, one thread, deterministic
algorithms: :mod:`rain_adapter.demo.train`), but floating-point reductions differ between CPUs and
library builds, and 1,200 AdamW steps amplify a last-bit difference into another world (a fresh
2-core machine once trained a world with LRM accuracy 0.52 instead of 0.96 under the same config).
So ``rain demo`` uses the shipped checkpoints, checked against their SHA-256, and trains only on
``--retrain`` (or for a config that has no shipped world, e.g. another ``--seed``).

Layout: ``rain_adapter/demo/worlds/<WorldConfig.key()>/`` holds exactly what
:func:`rain_adapter.demo.train.train_world` writes (``base/``, ``lrm/``, ``itm/``, the calibration and
evaluation sets, ``world.json``) plus ``MANIFEST.json``::

    {"key": "<config key>", "files": {"<relative path>": "<sha256>", ...},
     "sizes": {"<relative path>": <bytes>, ...},   (written since issue 24; optional)
     "weights_sha256": "<sha256 over the three checkpoints' tensors>",
     "soundness": {... the evaluation of the world when it was shipped ...}}

The same record is what keeps the *cached* world honest (issue 24): a world installed from the
package carries its ``MANIFEST.json``, a world trained here gets one written when it is made, and
:func:`rain_adapter.demo.train.ensure_world` re-checks it before every run (:func:`record_problem`:
sizes, SHA-256, no file missing or added). A changed file is a :class:`WorldIntegrityWarning` naming
it, and the world is reinstalled or retrained, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

MANIFEST = "MANIFEST.json"
SHIPPED_DIR = Path(__file__).parent / "worlds"
CHECKPOINTS = ("base", "lrm", "itm")
#: files of a world that are not part of its identity (outputs written next to it later)
_SKIP_DIRS = ("adapters", "demo")


class WorldIntegrityError(RuntimeError):
    """A shipped world whose files do not match their recorded SHA-256."""


class WorldIntegrityWarning(UserWarning):
    """A cached world (or a demo adapter built on it) whose files differ from the record written
    when it was made: it is not used, but reinstalled, retrained or rebuilt."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(root: Path) -> str:
    """SHA-256 over the tensors (name, dtype, shape, bytes) of base / LRM / ITM, in name order.

    Independent of the safetensors header layout, so a retrained world compares by value.
    """
    from safetensors import safe_open

    h = hashlib.sha256()
    for ck in CHECKPOINTS:
        for f in sorted((root / ck).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                for name in sorted(st.keys()):
                    t = st.get_tensor(name).contiguous()
                    h.update(f"{ck}/{name}:{t.dtype}:{tuple(t.shape)}".encode())
                    h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def world_files(root: Path) -> list[Path]:
    """Every file that makes up the world (not its adapters / demo outputs, not the manifest)."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] not in _SKIP_DIRS and rel.name != MANIFEST:
            out.append(p)
    return out


def write_manifest(root: Path, key: str, soundness: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash the world at ``root`` into ``root/MANIFEST.json`` (used when a world is shipped)."""
    files = world_files(root)
    manifest = {"key": key, "files": {p.relative_to(root).as_posix(): file_sha256(p) for p in files},
                "sizes": {p.relative_to(root).as_posix(): p.stat().st_size for p in files},
                "weights_sha256": weights_sha256(root), "soundness": soundness}
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, root / MANIFEST)
    return manifest


def read_manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / MANIFEST).read_text())


def record_problem(root: Path) -> str | None:
    """What differs between the world at ``root`` and its ``MANIFEST.json``, naming the first file
    at fault (None: every recorded file is there, a plain file, with its recorded size and SHA-256,
    and no other file belongs to the world). Sizes are compared first (free), then the hashes."""
    try:
        manifest = read_manifest(root)
        files, sizes = dict(manifest["files"]), dict(manifest.get("sizes") or {})
    except FileNotFoundError:
        return f"{MANIFEST} is missing (nothing records the files the world was made with)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for rel, want in files.items():
        p = root / rel
        if p.is_symlink():
            return f"{rel} is a symlink (to {os.path.realpath(p)})"
        if not p.is_file():
            return f"{rel} is missing"
        if rel in sizes and p.stat().st_size != sizes[rel]:
            return f"{rel} has {p.stat().st_size} bytes, the record says {sizes[rel]}"
        got = file_sha256(p)
        if got != want:
            return f"{rel} has SHA-256 {got[:12]}…, the record says {want[:12]}…"
    extra = [p.relative_to(root).as_posix() for p in world_files(root) if p.relative_to(root).as_posix() not in files]
    if extra:
        return f"{extra[0]} is not part of the world's record (a file was added)"
    return None


def verify(root: Path) -> dict[str, Any]:
    """Check every file of the world at ``root`` against its manifest; returns the manifest.

    Raises :class:`WorldIntegrityError` naming the first file that is missing or differs.
    """
    problem = record_problem(root)
    if problem is not None:
        hint = "reinstall rain-adapter" if "missing" in problem else "reinstall rain-adapter, or `rain demo --retrain`"
        raise WorldIntegrityError(f"shipped world {root}: {problem} ({hint})")
    return read_manifest(root)


def shipped_world(key: str) -> Path | None:
    """The shipped world for a config key, or None."""
    root = SHIPPED_DIR / key
    return root if (root / MANIFEST).is_file() else None


def install(src: Path, dest: Path) -> None:
    """Verify the shipped world ``src`` and copy it to ``dest`` atomically (temp dir + rename)."""
    verify(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        shutil.copytree(src, tmp / "w")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp / "w", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare_to_shipped(root: Path, key: str) -> str | None:
    """After a retrain: one line saying whether the world at ``root`` equals the shipped one
    (weights by value); None when no world is shipped for ``key``."""
    src = shipped_world(key)
    if src is None:
        return None
    want = read_manifest(src)["weights_sha256"]
    got = weights_sha256(root)
    if got == want:
        return f"retrained weights are identical to the shipped world's (SHA-256 {got[:12]}…)"
    return (f"retrained weights differ from the shipped world's (SHA-256 {got[:12]}… vs {want[:12]}…): "
            "floating-point reductions differ between CPUs / library builds; compare the evaluations below")


def provenance(root: Path, key: str) -> str:
    """Where the world at ``root`` comes from, in one line: the shipped world (same weights), a world
    trained here that equals it, one that differs, or one for a config with no shipped world."""
    src = shipped_world(key)
    if src is None:
        return "trained on this machine (no world ships for this config)"
    if weights_sha256(root) == read_manifest(src)["weights_sha256"]:
        return "the shipped world (weights match MANIFEST.json)"
    return ("trained on this machine, and NOT the shipped world (weights differ from MANIFEST.json; "
            "delete the cache directory to use the shipped one)")


def compare_soundness(measured: dict[str, Any], key: str, limit: int | None) -> str | None:
    """One line comparing this evaluation with the one recorded when the world shipped (same rows),
    or None when no record applies."""
    src = shipped_world(key)
    rec = read_manifest(src).get("soundness") if src is not None else None
    if not rec or rec.get("limit") != limit:
        return None
    diffs = [f"{m} {k} {measured[m][k]:.2f} (shipped {v:.2f})" for m, row in rec["metrics"].items()
             if m in measured for k, v in row.items() if k in measured[m] and abs(measured[m][k] - v) > 1e-9]
    if not diffs:
        return "evaluation identical to the shipped world's record"
    return "evaluation differs from the shipped world's record: " + "; ".join(diffs[:6])
