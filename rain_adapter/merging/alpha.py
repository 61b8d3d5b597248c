"""Stage 2's closed form for α and its normalisation to mean 1 after clipping (docs/DESIGN.md §6.3).

Per (layer, head), from the mean attention statistics ``[L, H]``::

    g = a1 − ρ u1                      ("level")      g = (a1 − a0) − ρ (u1 − u0)      ("gain")
    α_raw = g / (1 + u1)

``alpha_norm="none"``: α = clip(α_raw, 0, α_max).

``alpha_norm="mean"`` (default): with m = mean(α_raw) over all N = L·H entries and α₀ = α_raw / m,
α = clip(c·α₀, 0, α_max) where the scale c > 0 solves

    F(c) = (1/N) Σ_i clip(c·α₀_i, 0, α_max) = 1

so that λ means the same on every method: the mean coefficient over heads is exactly 1, as for
task arithmetic (α ≡ 1) and ``rain-stage1``. Clipping alone (c = 1) gave means of 0.68–0.71 in
measured builds. F is continuous, non-decreasing and piecewise linear in c; only the P entries
with α₀_i > 0 contribute, so its supremum is P·α_max / N. With them sorted q_0 ≥ … ≥ q_{P−1} and
S_k = Σ_{i ≥ k} q_i, the piece on which the top k entries sit at α_max is
h_k(c) = (k·α_max + c·S_k) / N ≥ F(c) for every c, with equality on F's k-th piece; hence each
root s_k = (N − k·α_max) / S_k of h_k = 1 is ≤ the root c* of F, and the one on the true piece
equals it:

    c* = max_{0 ≤ k < P} (N − k·α_max) / S_k          (exact, O(N log N), float64)

It exists iff P·α_max ≥ N (at equality every positive head sits at α_max); otherwise
:class:`Stage2Error` (in particular whenever α_max < 1). When no entry of α₀ lies outside
[0, α_max], F(1) = 1 already and c = 1 is used as is, so such builds give the same α bit for bit
as before the renormalisation existed. c > 0 and clipping are monotone, so the order of the heads
is kept (ties only where clipping makes them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Stage2Error", "ALPHA_GRADS", "ALPHA_NORMS", "AlphaResult", "alpha_with_stats", "alpha_from_stats",
           "mean_one_scale", "alpha_stats", "format_alpha_stats"]

ALPHA_GRADS = ("level", "gain")
ALPHA_NORMS = ("mean", "none")


class Stage2Error(RuntimeError):
    """Stage 2 cannot produce meaningful coefficients (empty / all-zero statistics, bad options)."""


@dataclass(frozen=True)
class AlphaResult:
    """α (float32 ``[L, H]``), α_raw (float32), the effective normaliser n with
    α = clip(α_raw / n, 0, α_max) (n = m / c under ``mean``, 1 under ``none``), and
    :func:`alpha_stats` (``config.stage2["alpha_stats"]``)."""

    alpha: Tensor
    raw: Tensor
    normaliser: float
    stats: dict


def mean_one_scale(alpha0: Tensor, alpha_max: float) -> float:
    """The scale c with mean(clip(c·α₀, 0, α_max)) = 1 over all entries of ``alpha0`` (module docstring).

    Exact: c = max_k (N − k·α_max) / S_k over the positive entries sorted descending, S_k their
    suffix sums; float64. Raises :class:`Stage2Error` when P·α_max < N (P = number of positive
    entries), i.e. when no scale reaches mean 1.
    """
    a = alpha0.detach().double().flatten()
    n = a.numel()
    q = torch.sort(a[a > 0], descending=True).values
    p = q.numel()
    if p == 0 or p * alpha_max < n:
        raise Stage2Error(
            f"cannot renormalise α to mean 1 after clipping to [0, {alpha_max:g}]: {p} of {n} heads have "
            f"α_raw > 0, so the largest reachable mean is {p}·α_max/{n} = {p * alpha_max / max(n, 1):.4g} < 1 "
            f"(needs α_max ≥ {n / max(p, 1):.4g}); raise --alpha-max or use --alpha-norm none")
    suffix = torch.flip(torch.cumsum(torch.flip(q, (0,)), 0), (0,))          # S_k = Σ_{i ≥ k} q_i
    k = torch.arange(p, dtype=torch.float64)
    return float(((n - k * alpha_max) / suffix).max())


def alpha_stats(alpha: Tensor, pre: Tensor, alpha_max: float, *, scale: float, normaliser: float,
                mean_clip_only: float) -> dict:
    """Spread of the final α over all N heads: mean, std (population), min, max (of the stored
    float32 α); the shares clipped to α_max and to 0 (pre-clip value ``pre`` ≥ α_max, resp. ≤ 0, in
    float64: the float32 α_max may round below α_max); the scale c, the normaliser m = mean(α_raw)
    and mean(clip(α₀, 0, α_max)), the mean that clipping alone would have left."""
    a = alpha.double().flatten()
    pre = pre.double().flatten()
    n = max(a.numel(), 1)
    return {
        "n": int(a.numel()), "mean": float(a.mean()), "std": float(a.std(unbiased=False)),
        "min": float(a.min()), "max": float(a.max()),
        "frac_at_max": float((pre >= alpha_max).sum()) / n, "frac_at_zero": float((pre <= 0).sum()) / n,
        "scale": float(scale), "normaliser": float(normaliser), "mean_clip_only": float(mean_clip_only),
    }


def format_alpha_stats(st: dict, alpha_max: float | None = None) -> str:
    """One line: ``α over N heads: mean … std … min … max …; at α_max …%, at 0 …%; scale c …``."""
    def g(k: str) -> float:
        v = st.get(k)
        return float(v) if isinstance(v, (int, float)) else float("nan")

    line = (f"α over {st.get('n', '?')} heads: mean {g('mean'):.4f} std {g('std'):.4f} min {g('min'):.4f} "
            f"max {g('max'):.4f}; at α_max{'' if alpha_max is None else f'={alpha_max:g}'} "
            f"{100 * g('frac_at_max'):.1f}%, at 0 {100 * g('frac_at_zero'):.1f}%")
    if "scale" in st:
        line += f"; scale c {g('scale'):.4g} (mean with clipping only: {g('mean_clip_only'):.4f})"
    return line


def _raw(a1: Tensor, u1: Tensor, rho: float, alpha_grad: str, a0: Tensor | None, u0: Tensor | None) -> Tensor:
    """α_raw = g / (1 + u1) in float64, after checking the options and statistics."""
    if alpha_grad not in ALPHA_GRADS:
        raise Stage2Error(f"alpha_grad must be one of {ALPHA_GRADS}, got {alpha_grad!r}")
    a1, u1 = a1.double(), u1.double()
    for name, t in (("a", a1), ("u", u1)):
        if not torch.isfinite(t).all():
            raise Stage2Error(f"attention statistic {name} holds NaN/Inf")
    if not bool((a1 > 0).any()):
        raise Stage2Error("all alignment statistics a are zero: the probe saw no attention from related response "
                          "tokens to instruction tokens (spans / tokenisation / attention probe broken)")
    if alpha_grad == "level":
        g = a1 - rho * u1
    else:
        if a0 is None or u0 is None:
            raise Stage2Error("alpha_grad='gain' needs the λ = 0 statistics a0 and u0")
        g = (a1 - a0.double()) - rho * (u1 - u0.double())
    return g / (1.0 + u1)


def alpha_with_stats(a1: Tensor, u1: Tensor, *, rho: float = 0.5, alpha_grad: str = "level",
                     a0: Tensor | None = None, u0: Tensor | None = None, alpha_norm: str = "mean",
                     alpha_max: float = 1.5) -> AlphaResult:
    """α per (layer, head) from mean statistics ``[L, H]`` (module docstring), with its spread.

    ``mean``: α = clip(c·α_raw/m, 0, α_max), m = mean(α_raw), c from :func:`mean_one_scale`
    (c = 1 when nothing is clipped); ``none``: α = clip(α_raw, 0, α_max). Raises
    :class:`Stage2Error` on bad options, all-zero or non-finite statistics, m ≤ 0, or when mean 1
    is unreachable under α_max.
    """
    if alpha_norm not in ALPHA_NORMS:
        raise Stage2Error(f"alpha_norm must be one of {ALPHA_NORMS}, got {alpha_norm!r}")
    if not (alpha_max > 0 and math.isfinite(alpha_max)):
        raise Stage2Error(f"alpha_max must be a positive finite number, got {alpha_max!r}")
    raw = _raw(a1, u1, rho, alpha_grad, a0, u0)
    scale = 1.0
    if alpha_norm == "mean":
        m = float(raw.mean())
        if not (m > 0 and math.isfinite(m)):
            raise Stage2Error(
                f"mean raw α over all heads is {m:.3e} (≤ 0): cannot normalise to mean 1 "
                f"(alpha_grad={alpha_grad!r}, rho={rho}); try alpha_grad='level' or a smaller rho")
        pre = raw / m
        if bool(((pre < 0) | (pre > alpha_max)).any()):
            scale = mean_one_scale(pre, alpha_max)
            pre = pre * scale
    else:
        m = 1.0
        pre = raw.clone()
    clip_only = float((raw / m).clamp(0.0, alpha_max).mean())
    alpha = pre.clamp(0.0, alpha_max).float()
    stats = alpha_stats(alpha, pre, alpha_max, scale=scale, normaliser=m, mean_clip_only=clip_only)
    return AlphaResult(alpha, raw.float(), m / scale, stats)


def alpha_from_stats(a1: Tensor, u1: Tensor, *, rho: float = 0.5, alpha_grad: str = "level",
                     a0: Tensor | None = None, u0: Tensor | None = None, alpha_norm: str = "mean",
                     alpha_max: float = 1.5) -> tuple[Tensor, Tensor, float]:
    """(α, α_raw, effective normaliser n) of :func:`alpha_with_stats`: α = clip(α_raw / n, 0, α_max)
    with n = mean(α_raw) / c under ``mean`` (n = mean(α_raw) when nothing is clipped), 1 under ``none``."""
    r = alpha_with_stats(a1, u1, rho=rho, alpha_grad=alpha_grad, a0=a0, u0=u0, alpha_norm=alpha_norm,
                         alpha_max=alpha_max)
    return r.alpha, r.raw, r.normaliser
