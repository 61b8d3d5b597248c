"""Stage 1: reasoning-aware null-space projection of a task vector (docs/DESIGN.md §6.2).

For one module with task vector Δ ``[out, in]`` and features X ``[n, in]`` (the module inputs at
the thinking positions, one row per position), take the thin SVD ``X = P diag(s) Vᵀ`` with
V ``[in, k]``, k = min(n, in) (the left singular vectors of the paper's ``X [in, n]``). Then

    hard:   Δ⊥ = Δ − (Δ V_m) V_mᵀ,   V_m = the fewest leading directions holding a fraction
            E = ``protect_energy`` of Σ s² (never those with s ≤ rtol·s_max); E = 1.0 keeps every
            direction with s > rtol·s_max: the exact pseudo-inverse projector, Δ⊥ Xᵀ = 0.
            rtol defaults to max(n, in)·eps(dtype) (``torch.linalg.pinv``'s cut-off; 1.5e-5 for a
            float32 [48, 128] X). A fixed 1e-4 left residuals of 2e-4 on the tiny triple: the dropped
            directions' share of ‖ΔX‖ is about sqrt(Σ_dropped s²)/‖s‖, so the cut-off must sit well
            below the residual target.
    exact:  ``hard`` with E = 1.0, by name: remove every direction of the feature row space above
            rtol (Δ⊥ Xᵀ = 0 up to rtol); ``protect_energy`` is not used. Bit for bit the same
            result as ``hard`` at 1.0. With many more rows than the width it removes most of Δ
            (the build warns when the kept norm is near zero, ``report.kept_norm_check``).
    ridge:  Δ⊥ = Δ − (Δ V) diag(s² / (s² + ρ)) Vᵀ,   ρ = ``ridge`` · mean(s²)
    none:   Δ⊥ = Δ
    random: a control, not a method: Δ⊥ = Δ − (Δ Q) Qᵀ with Q ``[in, m]`` an orthonormal basis of
            a random m-dimensional subspace (m as for ``hard``; Gaussian, seeded per module). It
            removes as many input directions as ``hard`` but ones unrelated to the thinking
            features, so comparing the two separates "which directions" from "how much of Δ".

No ``[in, in]`` matrix is formed (beyond V itself when n ≥ in). Computed in float32 by default,
float64 on request. A bias delta is not projected (it shifts every position alike); it is only
stored with ``--merge-bias``.

Per-module statistics: ``rows`` (n), ``rank_x`` (numerical rank of X), ``protected_rank`` (m, the
number of protected input directions), ``protected_energy`` (fraction of Σ s² in them),
``residual`` = ‖Δ⊥ Xᵀ‖ / ‖Δ Xᵀ‖ and ``kept_norm`` = ‖Δ⊥‖ / ‖Δ‖ (Frobenius).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

PROJECTIONS = ("hard", "exact", "ridge", "none", "random")
#: projections that remove the leading m directions chosen by ``protect_energy`` (exact: m = rank)
ENERGY_PROJECTIONS = ("hard", "random")
#: Chosen on behaviour in the toy world (bench/RESULTS.md): accuracy at equal compliance was best
#: at E = 0.9-0.95 and lower at 0.99 (which also pushed compliance out to λ ≈ 4). DESIGN's
#: provisional 0.99 protects more of the thinking-position outputs at the cost of more of Δ.
DEFAULT_PROTECT_ENERGY = 0.95
DEFAULT_RIDGE = 0.1
DEFAULT_RTOL: float | None = None  # None → max(n, in)·eps(dtype), torch.linalg.pinv's default
#: CPU SVDs below this many flops (k²·m for an [n, in] X, k = min, m = max) run on one thread: they
#: are latency-bound chains of small LAPACK steps, each an OpenMP barrier. Measured on a 2-core CPU
#: shared with another job: a [192, 2560] float32 SVD takes 39 ms on 1 thread and 4.4 s on 2
#: (threads spin at barriers waiting for a descheduled sibling); 91 of them were 40% of a build.
SMALL_SVD_FLOPS = 2e9


@dataclass
class ProjectionStats:
    rows: int
    rtol: float
    rank_x: int
    protected_rank: int
    protected_energy: float
    residual: float
    kept_norm: float

    def to_dict(self) -> dict:
        return asdict(self)


def feature_basis(X: Tensor, *, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Thin SVD of the features: ``(V [in, k], s [k])`` with k = min(n, in), s descending."""
    if X.ndim != 2:
        raise ValueError(f"features must be [n, in], got {tuple(X.shape)}")
    if not torch.isfinite(X).all():
        raise ValueError("features contain NaN/inf (check the LRM forward in this dtype)")
    k, m = sorted(X.shape)
    with _cpu_threads(1 if X.device.type == "cpu" and k * k * m < SMALL_SVD_FLOPS else None):
        _, s, vh = torch.linalg.svd(X.to(dtype), full_matrices=False)
    return vh.mT, s


@contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    """Temporarily cap torch's intra-op CPU threads at ``n`` (None: leave them), then restore."""
    old = torch.get_num_threads()
    if n is None or old <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def default_rtol(n: int, d: int, dtype: torch.dtype) -> float:
    """``max(n, in)·eps(dtype)``: the numerical-rank cut-off relative to s_max."""
    return max(n, d) * torch.finfo(dtype).eps


def protected_count(s: Tensor, protect_energy: float, rtol: float = 1e-4) -> int:
    """m: the fewest leading directions holding ``protect_energy`` of Σ s², capped by the
    numerical rank (#s > rtol·s_max). ``protect_energy = 1`` → the numerical rank."""
    if not 0.0 <= protect_energy <= 1.0:
        raise ValueError(f"protect_energy must be in [0, 1], got {protect_energy}")
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    rank = int((s > rtol * s[0]).sum())
    if protect_energy >= 1.0:
        return rank
    if protect_energy <= 0.0:
        return 0
    e = s.double() ** 2
    cum = torch.cumsum(e, 0) / e.sum()
    m = int(torch.searchsorted(cum, torch.tensor(protect_energy, dtype=cum.dtype), right=False)) + 1
    return min(m, rank)


def project(delta: Tensor, X: Tensor, *, projection: str = "hard",
            protect_energy: float = DEFAULT_PROTECT_ENERGY, ridge: float = DEFAULT_RIDGE,
            rtol: float | None = DEFAULT_RTOL, dtype: torch.dtype = torch.float32, device=None,
            generator: torch.Generator | None = None) -> tuple[Tensor, ProjectionStats]:
    """Project ``delta [out, in]`` away from the row space of ``X [n, in]``; returns
    ``(Δ⊥ [out, in] in delta's dtype on delta's device, stats)``. ``generator`` (CPU) draws the
    ``random`` control's subspace (ignored otherwise; default: seed 0)."""
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if projection == "exact":  # the exact projector: hard, every direction above rtol
        projection, protect_energy = "hard", 1.0
    if delta.ndim != 2 or X.ndim != 2 or delta.shape[1] != X.shape[1]:
        raise ValueError(f"shape mismatch: delta {tuple(delta.shape)} [out, in] vs features {tuple(X.shape)} [n, in]")
    out_dtype, out_dev = delta.dtype, delta.device
    dev = torch.device(device) if device is not None else delta.device
    D = delta.to(dev, dtype)
    Xd = X.to(dev, dtype)
    V, s = feature_basis(Xd, dtype=dtype)
    if rtol is None:
        rtol = default_rtol(X.shape[0], X.shape[1], dtype)
    rank_x = int((s > rtol * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0
    energy_total = float((s.double() ** 2).sum()) or 1.0
    if projection == "none":
        P = D
        m, energy = 0, 0.0
    elif projection in ("hard", "random"):
        m = protected_count(s, protect_energy, rtol)
        if projection == "hard":
            B = V[:, :m]
            energy = float((s[:m].double() ** 2).sum()) / energy_total
        else:
            g = generator if generator is not None else torch.Generator().manual_seed(0)
            B, _ = torch.linalg.qr(torch.randn(D.shape[1], m, generator=g, dtype=torch.float64))
            B = B.to(dev, dtype)
            # share of the feature energy that the random directions happen to hold
            energy = float(torch.linalg.matrix_norm((Xd @ B).double()) ** 2) / energy_total
        P = D - (D @ B) @ B.mT  # remove the m directions of the orthonormal basis B [in, m]
    else:
        if ridge <= 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        rho = ridge * float((s.double() ** 2).mean())
        w = (s ** 2) / (s ** 2 + rho)
        P = D - ((D @ V) * w) @ V.mT
        m, energy = rank_x, float(((s.double() ** 2) * w.double()).sum()) / energy_total
    dx = torch.linalg.matrix_norm(D @ Xd.mT)
    res = float(torch.linalg.matrix_norm(P @ Xd.mT) / dx) if float(dx) > 0 else 0.0
    dn = torch.linalg.matrix_norm(D)
    kept = float(torch.linalg.matrix_norm(P) / dn) if float(dn) > 0 else 0.0
    stats = ProjectionStats(rows=int(X.shape[0]), rtol=float(rtol), rank_x=rank_x, protected_rank=m,
                            protected_energy=energy, residual=res, kept_norm=kept)
    if projection == "none":
        return delta.clone(), stats
    return P.to(out_dev, out_dtype), stats
