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

__all__ = ["rain_linear_torch", "check_args"]


def check_args(
    x2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    delta: Tensor | None,
    lora_A: Tensor | None,
    lora_B: Tensor | None,
    bias_delta: Tensor | None,
) -> None:
    """Validate shapes; errors name ``rain_adapter.kernels`` and the offending argument."""
    where = "rain_adapter.kernels.rain_linear"
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
) -> Tensor:
    """y ``[M, N]`` = x Wᵀ + b + s ⊙ (x Dᵀ + bias_delta) (or (x Aᵀ) Bᵀ), in x's dtype.

    x2d ``[M, K]``, weight ``[N, K]``, bias ``[N]``|None, scale ``[M]`` (λ per row, float32;
    ``[1]`` broadcasts), delta ``[N, K]``|None, lora_A ``[r, K]``|None, lora_B ``[N, r]``|None,
    bias_delta ``[N]``|None. Rows with λ = 0 are bit-for-bit ``F.linear(x2d, weight, bias)``.
    """
    check_args(x2d, weight, bias, scale, delta, lora_A, lora_B, bias_delta)
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
        t = F.linear(x2d, lora_A.to(dt)).to(acc)           # [M, r] shrink, fp32
        d = F.linear(t, lora_B.to(acc))                     # [M, N] expand, fp32
    else:
        d = torch.zeros_like(y, dtype=acc)
    if bias_delta is not None:
        d = d + bias_delta.to(acc)
    s2 = s.to(acc).reshape(-1, 1)
    out = (y.to(acc) + s2 * d).to(y.dtype)
    return torch.where(s2 != 0, out, y)
