"""RAIN linear kernels (installed as ``rain_kernels``).

``rain_linear(x2d, weight, bias, scale, delta=None, lora_A=None, lora_B=None, bias_delta=None)``
computes, for x2d ``[M, K]``, weight ``[N, K]`` and a float32 λ per row ``scale [M]``::

    y [M, N] = x Wᵀ + b + scale[:, None] * (x Dᵀ + bias_delta)        (dense D [N, K])
    y [M, N] = x Wᵀ + b + scale[:, None] * ((x Aᵀ) Bᵀ + bias_delta)   (low rank A = lora_A [r, K], B = lora_B [N, r])

in x's dtype. Dispatch: the Triton kernels when x is on CUDA and Triton imports, the plain
PyTorch path otherwise. ``RAIN_KERNEL=torch|triton|auto`` (read at each call) forces a path;
``triton`` on CPU needs ``TRITON_INTERPRET=1`` (tests only).
"""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from .torch_path import check_args, lowrank_shrink_torch, rain_linear_torch, rain_linear_torch_fast

__all__ = ["rain_linear", "rain_linear_torch", "rain_linear_triton", "triton_available",
           "kernel_mode", "use_triton", "lowrank_shrink", "rain_linear_torch_fast"]

#: x Aᵀ for stacked factors ``[Σr, K]``: the grouped shrink (one GEMM, any device; see ``rain_linear(shrunk=)``)
lowrank_shrink = lowrank_shrink_torch

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when ``triton`` imports (it does not say a GPU is present)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_mode() -> str:
    """The ``RAIN_KERNEL`` setting: ``torch``, ``triton`` or ``auto`` (the default)."""
    mode = os.environ.get("RAIN_KERNEL", "auto").strip().lower() or "auto"
    if mode not in ("torch", "triton", "auto"):
        raise ValueError(f"rain_kernels: RAIN_KERNEL must be torch|triton|auto, got {mode!r}")
    return mode


def rain_linear_triton(
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
    """The Triton path (through the ``rain::dense_linear`` / ``rain::lowrank_linear`` custom ops).

    ``shrunk`` (t = x Aᵀ ``[M, r]``, e.g. a column slice of a grouped shrink) skips the shrink
    kernel: the ``split`` tile kernel reads t through its strides."""
    from . import ops  # imports triton

    if delta is not None:
        return ops.dense_linear(x2d, weight, bias, scale, delta, bias_delta)
    if lora_A is not None and lora_B is not None:
        if shrunk is not None:
            return ops.lowrank_linear_shrunk(x2d, weight, bias, scale, lora_A, lora_B, bias_delta, shrunk)
        return ops.lowrank_linear(x2d, weight, bias, scale, lora_A, lora_B, bias_delta)
    return rain_linear_torch(x2d, weight, bias, scale, None, None, None, bias_delta)


def use_triton(x2d: Tensor) -> bool:
    """True when :func:`rain_linear` would take the Triton path for ``x2d`` (``RAIN_KERNEL``, device, dtype)."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    if x2d.dtype not in _TRITON_DTYPES:
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("rain_kernels: RAIN_KERNEL=triton but triton does not import")
        if not x2d.is_cuda and not _interpreting():
            raise RuntimeError("rain_kernels: RAIN_KERNEL=triton on a CPU tensor needs "
                               "TRITON_INTERPRET=1 (set before triton is imported)")
        return True
    return x2d.is_cuda and triton_available()


def rain_linear(
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
    """y ``[M, N]`` = x Wᵀ + b + scale ⊙ (x Dᵀ + bias_delta) (or (x Aᵀ) Bᵀ), in x's dtype.

    x2d ``[M, K]``, weight ``[N, K]``, bias ``[N]``|None, scale ``[M]`` float32 (one λ per row),
    delta ``[N, K]``|None, lora_A ``[r, K]``|None, lora_B ``[N, r]``|None, bias_delta ``[N]``|None.
    ``shrunk`` ``[M, r]``|None: x Aᵀ computed by the caller (:func:`lowrank_shrink` of the stacked
    A of projections that share x, sliced per member; unscaled, float32 or x's dtype), so the
    shrink is not repeated. Triton on CUDA when available, PyTorch elsewhere; ``RAIN_KERNEL``
    forces either.
    """
    check_args(x2d, weight, bias, scale, delta, lora_A, lora_B, bias_delta, shrunk)
    if delta is None and lora_A is None and bias_delta is None:
        return torch.nn.functional.linear(x2d, weight, bias)
    if use_triton(x2d):
        return rain_linear_triton(x2d, weight, bias, scale, delta, lora_A, lora_B, bias_delta, shrunk)
    return rain_linear_torch(x2d, weight, bias, scale, delta, lora_A, lora_B, bias_delta, shrunk)
