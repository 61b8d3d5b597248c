"""Plain-PyTorch path of the RAIN linear (CPU, or CUDA when Triton is absent / forced off).

Math (shapes: x2d ``[M, K]``, weight ``[N, K]`` (``[out, in]``), scale ``[M]`` float32)::

    y = x Wᵀ + b + s[:, None] * (x Dᵀ + bias_delta)          dense delta D      [N, K]
    y = x Wᵀ + b + s[:, None] * ((x Aᵀ) Bᵀ + bias_delta)     low rank A = lora_A [r, K], B = lora_B [N, r]

The base product is exactly ``F.linear(x, W, b)``. The delta product runs in x's dtype with the
result lifted to float32, then scaled by ``s`` in float32 and added to the base in float32 before
one cast back to x's dtype. Rows with ``s == 0`` are taken from the base product untouched
(``torch.where``), so they are bit-for-bit ``F.linear(x, W, b)``; when every ``s`` is 0 the delta
work is skipped entirely (a host-side check, done for CPU tensors outside ``torch.compile``; on
CUDA it would cost a sync per call, and the ``where`` keeps the result exact anyway).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["rain_linear_torch", "rain_linear_torch_fast", "lowrank_shrink_torch", "check_args"]


def check_args(
    x2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    delta: Tensor | None,
    lora_A: Tensor | None,
    lora_B: Tensor | None,
    bias_delta: Tensor | None,
    shrunk: Tensor | None = None,
) -> None:
    """Validate shapes; errors name ``rain_kernels`` and the offending argument."""
    where = "rain_kernels.rain_linear"
    if x2d.dim() != 2:
        raise ValueError(f"{where}: x2d must be [M, K], got shape {tuple(x2d.shape)}")
    M, K = x2d.shape
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"{where}: weight must be [N, K={K}], got {tuple(weight.shape)}")
    N = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"{where}: bias must be [N={N}], got {tuple(bias.shape)}")
    if scale.dim() != 1 or scale.shape[0] not in (M, 1):
        raise ValueError(f"{where}: scale must be [M={M}] (or [1]), got {tuple(scale.shape)}")
    if delta is not None and (lora_A is not None or lora_B is not None):
        raise ValueError(f"{where}: give either delta or lora_A/lora_B, not both")
    if (lora_A is None) != (lora_B is None):
        raise ValueError(f"{where}: lora_A and lora_B must be given together")
    if delta is not None and tuple(delta.shape) != (N, K):
        raise ValueError(f"{where}: delta must be [N={N}, K={K}], got {tuple(delta.shape)}")
    if lora_A is not None and lora_B is not None:
        if lora_A.dim() != 2 or lora_A.shape[1] != K:
            raise ValueError(f"{where}: lora_A must be [r, K={K}], got {tuple(lora_A.shape)}")
        r = lora_A.shape[0]
        if tuple(lora_B.shape) != (N, r):
            raise ValueError(f"{where}: lora_B must be [N={N}, r={r}], got {tuple(lora_B.shape)}")
    if bias_delta is not None and tuple(bias_delta.shape) != (N,):
        raise ValueError(f"{where}: bias_delta must be [N={N}], got {tuple(bias_delta.shape)}")
    if shrunk is not None and (lora_A is None or tuple(shrunk.shape) != (M, lora_A.shape[0])):
        raise ValueError(f"{where}: shrunk (x Aᵀ) must be [M={M}, r] and needs lora_A, got {tuple(shrunk.shape)}")


def _may_sync(t: Tensor) -> bool:
    """True when reading ``t`` on the host is cheap and legal: a CPU tensor, not under compile.

    On CUDA the check would cost a device sync per layer (and break CUDA-graph capture), so it is
    skipped there; ``torch.where`` keeps λ = 0 rows exact either way, and RainLinear already skips
    the whole call when its host-side λ is all zero.
    """
    return not t.is_cuda and not torch.compiler.is_compiling()


def rain_linear_torch(
    x2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    delta: Tensor | None = None,
    lora_A: Tensor | None = None,
    lora_B: Tensor | None = None,
    bias_delta: Tensor | None = None,
    shrunk: Tensor | None = None,
) -> Tensor:
    """y ``[M, N]`` = x Wᵀ + b + s ⊙ (x Dᵀ + bias_delta) (or (x Aᵀ) Bᵀ), in x's dtype.

    x2d ``[M, K]``, weight ``[N, K]``, bias ``[N]``|None, scale ``[M]`` (λ per row, float32;
    ``[1]`` broadcasts), delta ``[N, K]``|None, lora_A ``[r, K]``|None, lora_B ``[N, r]``|None,
    bias_delta ``[N]``|None; ``shrunk`` ``[M, r]``|None: x Aᵀ already computed (a slice of a grouped
    shrink, :func:`lowrank_shrink_torch`), used instead of recomputing it. Rows with λ = 0 are
    bit-for-bit ``F.linear(x2d, weight, bias)``.
    """
    check_args(x2d, weight, bias, scale, delta, lora_A, lora_B, bias_delta, shrunk)
    y = F.linear(x2d, weight, bias)
    if delta is None and lora_A is None and bias_delta is None:
        return y
    s = scale.to(device=y.device, dtype=torch.float32)
    if _may_sync(s) and not bool(s.any()):
        return y  # every λ is 0: no delta work at all
    dt = x2d.dtype
    acc = torch.promote_types(dt, torch.float32)            # fp32 (fp64 stays fp64)
    if delta is not None:
        d = F.linear(x2d, delta.to(dt)).to(acc)
    elif lora_A is not None and lora_B is not None:
        t = (F.linear(x2d, lora_A.to(dt)) if shrunk is None else shrunk).to(acc)  # [M, r] shrink, fp32
        d = F.linear(t, lora_B.to(acc))                     # [M, N] expand, fp32
    else:
        d = torch.zeros_like(y, dtype=acc)
    if bias_delta is not None:
        d = d + bias_delta.to(acc)
    s2 = s.to(acc).reshape(-1, 1)
    out = (y.to(acc) + s2 * d).to(y.dtype)
    return torch.where(s2 != 0, out, y)


def lowrank_shrink_torch(x2d: Tensor, lora_A: Tensor) -> Tensor:
    """t ``[M, r]`` = x Aᵀ for x2d ``[M, K]``, lora_A ``[r, K]`` (or several A stacked, ``[Σr, K]``),
    in x's dtype (float32 / float64 on the fast path). One GEMM; the grouped shrink of the runtime."""
    return F.linear(x2d, lora_A if lora_A.dtype == x2d.dtype else lora_A.to(x2d.dtype))


def rain_linear_torch_fast(
    x2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    lam: float | Tensor,
    keep: Tensor | None = None,
    delta: Tensor | None = None,
    shrunk: Tensor | None = None,
    scaled: bool = False,
    lora_B: Tensor | None = None,
    bias_delta: Tensor | None = None,
) -> Tensor:
    """The eager fast path: y ``[M, N]`` = x Wᵀ + b + λ ⊙ (x Dᵀ or t Bᵀ, + bias_delta), no checks.

    For x2d ``[M, K]`` in float32 / float64 with every tensor in x's dtype (the caller checks), weight
    / delta ``[N, K]``, lora_B ``[N, r]``, ``shrunk`` = t = x Aᵀ ``[M, r]`` (may be a column block of
    a grouped shrink; ``scaled``: λ already applied to it). ``lam`` is one host float (uniform λ) or
    a column ``[M, 1]`` of per-row λ in x's dtype; either way the rows of t (r wide; of x for a dense
    delta) are multiplied by λ and one ``addmm`` adds (λ t) Bᵀ, so a row gets the same bits whether
    its λ came as the float or in a column (uniform runs = mixed batches = per-token λ). ``keep``
    ``[M, 1]`` bool (λ ≠ 0), given when some row has λ = 0: those rows are taken from
    ``F.linear(x, W, b)`` unchanged (``torch.where``), bit for bit, even if a factor holds NaN.
    A host float bakes λ into the call, so this path is for eager runs only: not under CUDA-graph
    capture or ``torch.compile`` (use :func:`rain_linear_torch`). The sum is formed in x's dtype
    (float32 accumulate in the GEMMs), not lifted to float32 first: the general path's result for
    float32 / float64 inputs up to rounding order.
    """
    y = F.linear(x2d, weight, bias)
    if delta is not None:
        lhs, rhs = x2d * lam, delta.t()
    elif shrunk is not None and lora_B is not None:
        lhs, rhs = (shrunk if scaled else shrunk * lam), lora_B.t()
    else:
        lhs = rhs = None
    if lhs is None:
        out = y if keep is None else y.clone()
    else:  # in place unless the base rows must survive for the where
        out = y.addmm_(lhs, rhs) if keep is None else torch.addmm(y, lhs, rhs)
    if bias_delta is not None:
        out.add_(bias_delta * lam)  # one rounding of λ·d_b, then the add: the same for float and column
    return out if keep is None else torch.where(keep, out, y)
