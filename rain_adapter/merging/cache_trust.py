"""What makes a cache entry the reading build's own (issue 24, docs/DESIGN.md §5.7): the checks the
feature cache (``feature_cache``) and the resume cache (``cache``) share.

An entry is trusted only when it is a plain file of the cache directory (a symlink may lead to
another build's data) and records the key of the build that reads it; a key directory's
``meta.json`` must name the directory, the reading build's key, and settings that hash to it.
These catch misplaced data (copied, renamed, linked); the key is a hash, not a signature.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .cache import settings_key


def first_link(paths: Iterable[Path]) -> Path | None:
    """The first of ``paths`` that is a symlink, or None."""
    return next((p for p in paths if p.is_symlink()), None)


def link_problem(link: Path) -> str:
    """The words for an entry reached through a symlink, naming the link and its target."""
    return f"{link} is a symlink (to {os.path.realpath(link)}): an entry reached through a link may be another build's"


def settings_diff(recorded: Any, current: dict[str, Any]) -> str:
    """``": calib_hash, radius differ"``: the settings whose values differ (empty when unknown)."""
    if not isinstance(recorded, dict):
        return ""
    diff = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    return f": {', '.join(diff[:6])} differ" if diff else ""


def meta_problem(d: Path, key: str, settings: dict[str, Any], has_entries: bool) -> str | None:
    """What is wrong with ``d/meta.json`` for the build of ``key`` / ``settings`` (None: it names
    ``key``, which is also ``d``'s name, and its settings hash to it; or it is absent from a
    directory with no entries)."""
    meta_p = d / "meta.json"
    if meta_p.is_symlink():
        return link_problem(meta_p)
    if not meta_p.is_file():
        return f"{meta_p} is missing (so nothing says which build made {d})" if has_entries else None
    try:
        meta = json.loads(meta_p.read_text())
        got, recorded = meta.get("key"), meta.get("settings")
    except (OSError, ValueError, AttributeError) as e:
        return f"{meta_p} is unreadable ({e})"
    if got != d.name or got != key or not isinstance(recorded, dict) or settings_key(recorded) != got:
        return (f"{meta_p} names key {got}, but its directory is {d.name} and this build's key is "
                f"{key}{settings_diff(recorded, settings)} (the directory was renamed or copied from another build)")
    return None


def unlink_quietly(paths: Iterable[Path]) -> None:
    """Remove each path (a symlink: the link only, never its target); errors are ignored."""
    for f in paths:
        try:
            f.unlink(missing_ok=True)
        except OSError:
            pass


def clear_entries(d: Path, subdir: str) -> None:
    """Drop every cache entry from ``d`` (``layer_*``, ``meta.json``, the files of ``d/subdir``); a
    symlink is unlinked, never followed."""
    sub = d / subdir
    files = [*d.glob("layer_*"), d / "meta.json"]
    if sub.is_symlink() or not sub.is_dir():
        files.append(sub)
    else:
        files += [p for p in sub.iterdir() if p.is_symlink() or p.is_file()]
    unlink_quietly(files)
