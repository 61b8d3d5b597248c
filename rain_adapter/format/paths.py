"""Where things live on disk: adapter home, shared calibration data, world cache."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # rain_adapter/
_REPO_ROOT = _PACKAGE_DIR.parent


def adapter_home() -> Path:
    """``$RAIN_ADAPTER_HOME`` or ``~/.cache/rain_adapter``: where adapters are found by name."""
    env = os.environ.get("RAIN_ADAPTER_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rain_adapter"


def cache_dir() -> Path:
    """Scratch cache (toy world checkpoints, NLTK data, ...): ``$RAIN_CACHE_DIR`` or ``~/.cache/rain_adapter``.

    Independent of ``$RAIN_ADAPTER_HOME`` so that tests with a private adapter home still share
    the (expensive) trained toy world.
    """
    env = os.environ.get("RAIN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rain_adapter"


def shared_calibration_dir() -> Path:
    """The method authors' calibration sets.

    Looked up in ``$RAIN_CALIB_DIR``, then ``<repo>/../shared/data/rain_calibration`` (the layout of a
    checkout), then ``./shared/data/rain_calibration``, then the copy shipped in the package
    (``rain_adapter/data/rain_calibration``, MIT, see its LICENSE).
    """
    candidates = []
    env = os.environ.get("RAIN_CALIB_DIR")
    if env:
        candidates.append(Path(env).expanduser())
    candidates += [
        _REPO_ROOT.parent / "shared" / "data" / "rain_calibration",
        Path.cwd().parent / "shared" / "data" / "rain_calibration",
        Path.cwd() / "shared" / "data" / "rain_calibration",
        _PACKAGE_DIR / "data" / "rain_calibration",
    ]
    for c in candidates:
        if (c / "reasoning_calibration_set.json").is_file():
            return c
    raise FileNotFoundError(
        "calibration sets not found; looked in: " + ", ".join(str(c) for c in candidates)
        + " (set RAIN_CALIB_DIR to the folder holding reasoning_calibration_set.json)"
    )
