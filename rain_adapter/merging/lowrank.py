"""Low-rank compression of module deltas (truncated SVD) and its fidelity report.

Math. For one module with stored delta ``D [out, in]`` and thin SVD ``D = U Σ Vᵀ``
(σ₁ ≥ σ₂ ≥ … ≥ 0), the best rank-r approximation in Frobenius norm (Eckart–Young) is

    D_r = U_r Σ_r V_rᵀ,   ‖D − D_r‖_F² = Σ_{i>r} σ_i²

We store it in PEFT's orientation, ``D_r = B A`` with

    A = Σ_r^{1/2} V_rᵀ   [r, in]     (lora_A)
    B = U_r Σ_r^{1/2}    [out, r]    (lora_B)

i.e. **√σ on each side** ("balanced" split): both factors have the same spectral norm, so storing
them in float16 / bfloat16 loses the same relative precision on either side, and neither factor
over/underflows for large or small σ. (Exports fold λ into B only; see ``export.py``.)

Rank choice, per module:

- ``rank=R``: r = min(R, out, in)  (then capped by ``max_rank``).
- ``rank_energy=E``: the smallest r with Σ_{i≤r} σ_i² ≥ E · Σ_i σ_i² (= E ‖D‖_F²), capped by
  ``max_rank``. Not the same knob as Stage 1's ``--protect-energy`` (that one is about the
  *inputs* X; this one is about the delta's own spectrum).

Every module keeps r ≥ 1 (an all-zero delta gets A = B = 0 with r = 1) so that exported LoRAs
never carry an empty matrix.

Stage 1's constraint survives. Stage 1 makes ``D X = 0`` for the protected inputs X ``[in, n]``,
i.e. every row of D is orthogonal to col(X). The right singular vectors with σ > 0 span the row
space of D, so ``V_rᵀ X = 0`` and therefore ``A X = 0`` and ``(B A) X = 0`` for every r: the
truncation only drops directions, it never adds one outside the row space. (The randomized SVD
keeps this too: its V is Dᵀ Q … and lies in the row space of D.) ``tests/test_lowrank.py``
checks it with a projected random delta.

Algorithms (all float32, on ``device``):

- low-rank input ``B₀ A₀`` (re-compression): exact, via QR of B₀ and A₀ᵀ and the SVD of the
  small ``[r₀, r₀]`` core — never forms the dense matrix.
- dense input, small or energy-based: ``torch.linalg.svd(D, full_matrices=False)``.
- dense input, fixed rank ``r`` well below ``min(out, in)`` on a big matrix: randomized SVD
  (``torch.svd_lowrank``, q = r + oversampling, ``niter`` power iterations). Energy mode with a
  ``max_rank`` on a big matrix uses it too: r ≤ max_rank needs only the top max_rank directions,
  and the total Σσ² = ‖D‖_F² is known exactly, so the energy test stays exact.

The reported ``rel_error`` = ‖D − BA‖_F / ‖D‖_F is measured on the factors actually stored
(dense input: the residual matrix; low-rank input: the exact dropped tail), so it is honest for
the randomized path as well.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..format.delta import ModuleDelta

#: Matrices with min(out, in) at or below this use the exact dense SVD.
EXACT_SVD_MAX_DIM = 2048
#: Extra columns for the randomized range finder, and power iterations.
OVERSAMPLE = 16
POWER_ITERS = 4

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


# ---------------------------------------------------------------------------------------------
# SVD back ends
# ---------------------------------------------------------------------------------------------
def _svd_of_lowrank(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD of ``B A`` (B ``[out, r]``, A ``[r, in]``): ``U [out, k], S [k], V [in, k]``."""
    Qb, Rb = torch.linalg.qr(B)            # [out, r], [r, r]
    Qa, Ra = torch.linalg.qr(A.T)          # [in, r],  [r, r]
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return Qb @ Uc, S, Qa @ Vch.T


def _svd_full(D: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    return U, S, Vh.T


def _svd_top(D: Tensor, q: int) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized top-``q`` SVD (Halko et al.) with oversampling and power iterations."""
    k = min(q + OVERSAMPLE, min(D.shape))
    U, S, V = torch.svd_lowrank(D, q=k, niter=POWER_ITERS)
    return U[:, :q], S[:q], V[:, :q]


def energy_rank(S: Tensor, total_energy: float, energy: float) -> int | None:
    """Smallest r with Σ_{i≤r} σ_i² ≥ energy · total; None if ``S`` does not reach it."""
    if total_energy <= 0.0:
        return 1
    cum = torch.cumsum(S.double() ** 2, 0) / total_energy
    # small slack so that energy = 1.0 on an exactly rank-r matrix picks r, not r+rounding noise
    hit = torch.nonzero(cum >= energy - 1e-9)
    if hit.numel() == 0:
        return None
    return int(hit[0, 0]) + 1


def _choose_svd(
    d: ModuleDelta, D: Tensor | None, *, rank: int | None, rank_energy: float | None, max_rank: int | None,
    total: float, device,
) -> tuple[Tensor, Tensor, Tensor, str]:
    """Return enough of the SVD (U, S, V, algorithm name) to pick the rank and build the factors."""
    if d.is_lowrank:
        A = d.lora_A.to(device=device, dtype=torch.float32)
        B = d.lora_B.to(device=device, dtype=torch.float32)
        U, S, V = _svd_of_lowrank(A, B)
        return U, S, V, "qr-svd"
    assert D is not None
    n = min(D.shape)
    big = n > EXACT_SVD_MAX_DIM
    if big and rank is not None:
        r = min(rank, max_rank or rank)
        if r + OVERSAMPLE < n // 2:
            U, S, V = _svd_top(D, r)
            return U, S, V, "randomized"
    if big and rank_energy is not None and max_rank is not None and max_rank + OVERSAMPLE < n // 2:
        # Either the energy is reached inside the top max_rank directions, or the cap applies:
        # both need only these directions (energy_rank sees the exact total ‖D‖²).
        U, S, V = _svd_top(D, max_rank)
        return U, S, V, "randomized"
    U, S, V = _svd_full(D)
    return U, S, V, "svd"


# ---------------------------------------------------------------------------------------------
# compression
# ---------------------------------------------------------------------------------------------
def _layer_of(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return None if m is None else int(m.group(1))


def _check_args(rank, rank_energy, max_rank) -> None:
    if (rank is None) == (rank_energy is None):
        raise ValueError("compress: give exactly one of rank=R (fixed) or rank_energy=E (fraction of Σσ² to keep)")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"compress: rank must be a positive int, got {rank!r}")
    if rank_energy is not None and not (0.0 < float(rank_energy) <= 1.0):
        raise ValueError(f"compress: rank_energy must lie in (0, 1], got {rank_energy!r}")
    if max_rank is not None and (not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1):
        raise ValueError(f"compress: max_rank must be a positive int, got {max_rank!r}")


def compress_one(
    d: ModuleDelta, *, rank: int | None = None, rank_energy: float | None = None, max_rank: int | None = None,
    device=None, name: str = "module",
) -> tuple[ModuleDelta, dict[str, Any]]:
    """Compress one module's delta; returns (low-rank ModuleDelta, {rank, energy_kept, rel_error, ...}).

    The factors come back on the input's device in the input's floating dtype; the SVD runs in
    float32 on ``device`` (default: where the delta lives). ``bias`` is passed through dense.
    """
    _check_args(rank, rank_energy, max_rank)
    src = d.delta if d.delta is not None else d.lora_A
    out_device, out_dtype = src.device, src.dtype
    device = torch.device(device) if device is not None else src.device
    out_f, in_f = d.shape
    D = None if d.is_lowrank else d.delta.to(device=device, dtype=torch.float32)
    if d.is_lowrank:
        A0 = d.lora_A.to(device=device, dtype=torch.float32)
        B0 = d.lora_B.to(device=device, dtype=torch.float32)
        total = float(torch.trace((B0.T @ B0).double() @ (A0 @ A0.T).double()).clamp_min(0.0))
    else:
        total = float(D.double().pow(2).sum())
    if not math.isfinite(total):
        raise ValueError(f"compress: module {name!r} holds NaN or Inf")

    U, S, V, algo = _choose_svd(d, D, rank=rank, rank_energy=rank_energy, max_rank=max_rank, total=total, device=device)
    if rank is not None:
        r = min(rank, out_f, in_f)
    else:
        # With the full spectrum, measure fractions against its own Σσ² (so E = 1.0 means "every
        # direction above float noise"); the randomized path only has the top ones: use ‖D‖².
        ref = total if algo == "randomized" else float((S.double() ** 2).sum())
        r = energy_rank(S, ref, float(rank_energy))
        if r is None:                      # only possible on the randomized path: cap applies
            r = S.numel()
    if max_rank is not None:
        r = min(r, max_rank)
    r = max(1, min(r, S.numel()))
    if total == 0.0:
        r = 1                               # all-zero delta: one zero direction, nothing to keep

    root = S[:r].clamp_min(0.0).sqrt()
    A = root[:, None] * V[:, :r].T          # [r, in]
    B = U[:, :r] * root[None, :]            # [out, r]

    # Frobenius error of the factorisation. Dense input: the residual itself (one GEMM, cheaper than
    # the SVD, and free of the cancellation of ‖D‖² − ‖D_r‖²). Low-rank input: the SVD is exact, so
    # the error is the dropped tail Σ_{i>r} σ_i² (summed directly, no cancellation either).
    if total > 0.0:
        if D is not None:
            err_sq = float(torch.sub(D, B @ A).double().pow(2).sum())
        else:
            err_sq = float((S[r:].double() ** 2).sum())
        rel_error = math.sqrt(err_sq / total)
        energy_kept = min(float((S[:r].double() ** 2).sum()) / total, 1.0)
    else:
        A.zero_()
        B.zero_()
        rel_error, energy_kept = 0.0, 1.0

    new = ModuleDelta(
        lora_A=A.to(device=out_device, dtype=out_dtype).contiguous(),
        lora_B=B.to(device=out_device, dtype=out_dtype).contiguous(),
        bias=d.bias,
    )
    stats = {
        "rank": int(r),
        "energy_kept": energy_kept,
        "rel_error": rel_error,
        "shape": [int(out_f), int(in_f)],
        "norm": math.sqrt(total),
        "algorithm": algo,
    }
    return new, stats


def compress(
    deltas: Mapping[str, ModuleDelta],
    *,
    rank: int | None = None,
    rank_energy: float | None = None,
    max_rank: int | None = None,
    device=None,
    progress: bool = True,
) -> tuple[dict[str, ModuleDelta], dict[str, Any]]:
    """Truncated-SVD compression of every module delta. Returns ``(low-rank deltas, fidelity)``.

    ``fidelity`` (stored as ``RainConfig.fidelity``)::

        {"settings": {"rank": R|None, "rank_energy": E|None, "max_rank": M|None, "split": "sqrt-sigma"},
         "modules": {name: {"rank", "energy_kept", "rel_error", "shape", "norm", "algorithm"}},
         "layers":  {"3": {"modules", "mean_rank", "energy_kept", "rel_error", "params_dense", "params_lowrank"}},
         "overall": {... same keys ...}}

    Per-layer / overall ``energy_kept`` and ``rel_error`` are norm-weighted aggregates
    (Σ kept σ² / Σ ‖D‖², √(Σ err² / Σ ‖D‖²)): the error of the concatenation of the modules.
    Use :func:`rank_field` for ``RainConfig.rank``.
    """
    _check_args(rank, rank_energy, max_rank)
    if not deltas:
        raise ValueError("compress: no module deltas given")
    from tqdm.auto import tqdm

    out: dict[str, ModuleDelta] = {}
    mods: dict[str, dict[str, Any]] = {}
    for name, d in tqdm(list(deltas.items()), desc="low-rank SVD", unit="module", disable=not progress):
        if not isinstance(d, ModuleDelta):
            raise TypeError(f"compress: module {name!r}: expected ModuleDelta, got {type(d).__name__}")
        out[name], mods[name] = compress_one(
            d, rank=rank, rank_energy=rank_energy, max_rank=max_rank, device=device, name=name
        )
    groups: dict[str, list[str]] = {}
    for name in mods:
        layer = _layer_of(name)
        groups.setdefault("other" if layer is None else str(layer), []).append(name)
    layers = {k: _aggregate([mods[n] for n in v]) for k, v in sorted(groups.items(), key=lambda kv: _sort_key(kv[0]))}
    fidelity = {
        "settings": {"rank": rank, "rank_energy": rank_energy, "max_rank": max_rank, "split": "sqrt-sigma"},
        "modules": mods,
        "layers": layers,
        "overall": _aggregate(list(mods.values())),
    }
    return out, fidelity


def _sort_key(k: str):
    return (0, int(k)) if k.isdigit() else (1, 0)


def _aggregate(stats: list[dict[str, Any]]) -> dict[str, Any]:
    tot = sum(s["norm"] ** 2 for s in stats)
    kept = sum(s["energy_kept"] * s["norm"] ** 2 for s in stats)
    err = sum((s["rel_error"] * s["norm"]) ** 2 for s in stats)
    dense = sum(s["shape"][0] * s["shape"][1] for s in stats)
    low = sum(s["rank"] * (s["shape"][0] + s["shape"][1]) for s in stats)
    ranks = [s["rank"] for s in stats]
    return {
        "modules": len(stats),
        "mean_rank": sum(ranks) / max(len(ranks), 1),
        "min_rank": min(ranks) if ranks else 0,
        "max_rank": max(ranks) if ranks else 0,
        "energy_kept": kept / tot if tot > 0 else 1.0,
        "rel_error": math.sqrt(err / tot) if tot > 0 else 0.0,
        "params_dense": dense,
        "params_lowrank": low,
    }


def rank_field(fidelity: Mapping[str, Any]) -> int | dict[str, int]:
    """``RainConfig.rank`` from a fidelity report: one int when all modules share it, else a map."""
    ranks = {n: int(s["rank"]) for n, s in fidelity["modules"].items()}
    values = set(ranks.values())
    return values.pop() if len(values) == 1 else ranks


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def format_fidelity(fidelity: Mapping[str, Any], *, worst: int = 5) -> str:
    """A text table for ``rain info``: settings, per layer, overall, and the worst modules."""
    if not fidelity or "modules" not in fidelity:
        return "fidelity: none recorded (dense adapter, or built without --storage lowrank)"
    st = fidelity.get("settings", {})
    how = (
        f"rank {st['rank']}" if st.get("rank") is not None
        else f"energy {st.get('rank_energy')}" if st.get("rank_energy") is not None else "imported"
    )
    if st.get("max_rank") is not None:
        how += f", max rank {st['max_rank']}"
    lines = [f"low-rank fidelity ({how}; split {st.get('split', '?')})", ""]
    hdr = f"{'layer':>6} {'mods':>4} {'rank min/mean/max':>18} {'energy kept':>11} {'rel err':>8} {'params':>9}"
    lines += [hdr, "-" * len(hdr)]

    def row(label: str, a: Mapping[str, Any]) -> str:
        ratio = a["params_lowrank"] / a["params_dense"] if a["params_dense"] else 0.0
        ranks = f"{a['min_rank']}/{a['mean_rank']:.1f}/{a['max_rank']}"
        return (f"{label:>6} {a['modules']:>4} {ranks:>18} {a['energy_kept']:>11.4f} "
                f"{a['rel_error']:>8.4f} {ratio:>8.1%}")

    for k, a in fidelity.get("layers", {}).items():
        lines.append(row(k, a))
    lines += ["-" * len(hdr), row("all", fidelity["overall"]), ""]
    mods = sorted(fidelity["modules"].items(), key=lambda kv: -kv[1]["rel_error"])[:worst]
    if mods:
        lines.append(f"worst {len(mods)} module(s) by relative Frobenius error:")
        for n, s in mods:
            lines.append(f"  {n}: rank {s['rank']}, energy kept {s['energy_kept']:.4f}, rel err {s['rel_error']:.4f}")
    lines.append("(params = low-rank / dense parameter count)")
    return "\n".join(lines)


__all__ = ["compress", "compress_one", "energy_rank", "format_fidelity", "rank_field"]
