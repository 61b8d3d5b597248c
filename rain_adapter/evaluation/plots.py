"""Plots of λ sweeps: metrics vs λ per method, and compliance vs format validity / accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _finite(xs: Sequence[float]) -> bool:
    return any(x == x and not math.isinf(x) for x in xs)


def plot_sweep(records: Sequence[dict[str, Any]], path: str | Path, *, title: str = "RAIN λ sweep") -> Path:
    """Write a PNG with three panels from sweep records ``{method, lambda, compliance,
    format_validity, accuracy, ...}``: (1) metrics vs λ, (2) format validity vs compliance,
    (3) accuracy vs compliance (one line per method, λ increasing along each line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    methods = list(dict.fromkeys(r["method"] for r in records))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    styles = {"compliance": "-", "format_validity": "--", "accuracy": ":"}
    for i, m in enumerate(methods):
        rs = sorted((r for r in records if r["method"] == m), key=lambda r: r["lambda"])
        lam = [r["lambda"] for r in rs]
        color = f"C{i}"
        for key, ls in styles.items():
            ys = [r[key] for r in rs]
            if _finite(ys):
                axes[0].plot(lam, ys, ls, color=color, marker=".", label=f"{m} {key}")
        comp = [r["compliance"] for r in rs]
        for ax, key in ((axes[1], "format_validity"), (axes[2], "accuracy")):
            ys = [r[key] for r in rs]
            if _finite(ys) and _finite(comp):
                ax.plot(comp, ys, "-o", color=color, label=m, markersize=3)
                for x, y, la in zip(comp, ys, lam):
                    ax.annotate(f"{la:g}", (x, y), fontsize=6, alpha=0.6)
    axes[0].set_xlabel("λ")
    axes[0].set_ylabel("rate")
    axes[0].set_title("metrics vs λ")
    axes[0].legend(fontsize=6)
    for ax, key in ((axes[1], "format validity"), (axes[2], "accuracy")):
        ax.set_xlabel("instruction compliance (prompt-level strict)")
        ax.set_ylabel(key)
        ax.set_title(f"{key} vs compliance")
        ax.legend(fontsize=7)
    for ax in axes:
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: What to print when :func:`plot_sweep_if_available` returns None.
NO_PLOT_HINT = 'matplotlib not installed: no plot (pip install -e ".[eval]")'


def plot_sweep_if_available(records: Sequence[dict[str, Any]], path: str | Path, *,
                            title: str = "RAIN λ sweep") -> Path | None:
    """:func:`plot_sweep`, or None when matplotlib (the optional ``eval`` extra) is not installed.

    The plot is an extra next to the CSV, so a sweep without matplotlib still succeeds; any other
    import error (our own code, a broken matplotlib dependency) propagates.
    """
    try:
        return plot_sweep(records, path, title=title)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "matplotlib":
            raise
        return None
