"""Where things live on disk: adapter home, the calibration sets, scratch cache."""

from __future__ import annotations

import os
from pathlib import Path

#: ``rain_adapter/``: the calibration sets ship inside it (``data/rain_calibration``).
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
PACKAGED_CALIBRATION_DIR = _PACKAGE_DIR / "data" / "rain_calibration"


def adapter_home() -> Path:
    """``$RAIN_ADAPTER_HOME`` or ``~/.cache/rain_adapter``: where adapters are found by name."""
    env = os.environ.get("RAIN_ADAPTER_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rain_adapter"


def cache_dir() -> Path:
    """Scratch cache (toy world checkpoints, de-quantised real weights, ...): ``$RAIN_CACHE_DIR`` or
    ``~/.cache/rain_adapter``.

    Independent of ``$RAIN_ADAPTER_HOME`` so that tests with a private adapter home still share
    the (expensive) trained toy world.
    """
    env = os.environ.get("RAIN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rain_adapter"


def calibration_dir() -> Path:
    """The folder holding the method authors' calibration sets (docs/DESIGN.md §5).

    ``$RAIN_CALIB_DIR`` when set (it must hold ``reasoning_calibration_set.json``), else the copy
    shipped in the package (``rain_adapter/data/rain_calibration``, MIT, see its LICENSE). Nothing
    depends on the working directory or on what lies beside a checkout: a build's default inputs
    are the same wherever it runs. Other sets are passed by flag (``--reasoning-calib``,
    ``--instruction-calib``).
    """
    env = os.environ.get("RAIN_CALIB_DIR")
    if not env:
        return PACKAGED_CALIBRATION_DIR
    d = Path(env).expanduser()
    if not (d / "reasoning_calibration_set.json").is_file():
        raise FileNotFoundError(
            f"RAIN_CALIB_DIR={env!r} has no reasoning_calibration_set.json; unset it to use the "
            f"packaged sets in {PACKAGED_CALIBRATION_DIR}"
        )
    return d

