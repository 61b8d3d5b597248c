"""Launchers of the Triton kernels and their ``torch.library`` custom ops.

``rain::dense_linear(x, weight, bias?, scale, delta, bias_delta?) -> y`` and
``rain::lowrank_linear(x, weight, bias?, scale, lora_A, lora_B, bias_delta?) -> y`` with
x ``[M, K]``, weight / delta ``[N, K]``, lora_A ``[r, K]``, lora_B ``[N, r]``, scale ``[M]`` (or
``[1]``) float32 on the device, y ``[M, N]`` in x's dtype. Both have fake (meta) implementations
so ``torch.compile`` traces through them. Path per call: ``TRITON_INTERPRET=1`` → one small fixed
config (CPU tests); M ≤ 16 → the split-K decode path (``decode.py``); otherwise the autotuned
tile kernels (``dense.py``, ``lowrank.py``). Low-rank picks ``split`` (shrink + GEMM with epilogue)
or ``fused`` (one launch) per shape: timed once per shape on CUDA, remembered, and
``RAIN_LOWRANK_VARIANT=split|fused`` forces one.
"""
import os
import warnings
from typing import Optional

import torch
import triton
from torch import Tensor

from . import decode
from ._common import INTERPRET_CFG, dot_precision, interpreting, next_pow2
from .dense import dense_kernel, dense_kernel_tuned
from .lowrank import lowrank_kernel, lowrank_kernel_tuned, shrink_kernel

__all__ = ["launch_dense", "launch_lowrank", "dense_linear", "lowrank_linear", "lowrank_linear_shrunk",
           "shrink_meta"]

_FUSED_MAX_R = 128
# Test switch: RAIN_KERNEL_POISON=1 (read at import) fills every buffer the launchers allocate
# (output, split-K workspace, shrink output) with NaN, so a tile that is never written shows up.
_POISON = os.environ.get("RAIN_KERNEL_POISON", "0") == "1"
_variant_cache: dict = {}
_warned: set = set()


def _empty(shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if _POISON else out


def _same_dtype(t: Optional[Tensor], dtype: torch.dtype, name: str) -> Optional[Tensor]:
    if t is None or t.dtype == dtype:
        return t
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"rain_kernels: {name} is {t.dtype}, x is {dtype}; casting on every "
                      f"call (store it in the input dtype)", stacklevel=3)
    return t.to(dtype)


def _scale(scale: Tensor, x: Tensor) -> tuple[Tensor, int]:
    s = scale.to(device=x.device, dtype=torch.float32)
    return s, (s.stride(0) if s.shape[0] == x.shape[0] and x.shape[0] > 1 else 0)


def _bias_args(bias: Optional[Tensor], x: Tensor) -> tuple[Tensor, bool]:
    return (bias, True) if bias is not None else (x, False)  # dummy pointer when absent


def _may_time(x: Tensor) -> bool:
    return (x.is_cuda and not interpreting() and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


def _gpu_decode(x: Tensor) -> bool:
    """The decode path on a real GPU (M ≤ 16, CUDA, not interpreted): where split-K pays."""
    return x.shape[0] <= decode.DECODE_M and x.is_cuda and not interpreting()


def shrink_meta(small: bool, R: int) -> dict:
    """Tile sizes and warps of the low-rank shrink launch (``small``: the decode path, M ≤ 16).
    The interpreter gets small tiles."""
    interp = interpreting()
    return dict(BLOCK_M=16 if small or interp else 64, BLOCK_R=min(64, max(16, next_pow2(R))),
                BLOCK_K=32 if interp else 128, num_warps=4)


def _splits_and_target(x: Tensor, out: Tensor, N: int, split_k: Optional[int]) -> tuple[int, Tensor, int]:
    """Split-K count (given, or the decode path's choice on CUDA), the buffer the tile kernel
    writes (``out``, or an fp32 workspace ``[split_k, M, N]``) and its split stride."""
    M, K = x.shape
    if split_k is None:
        split_k = decode.split_k_for(N, K, x.device) if _gpu_decode(x) else 1
    if split_k == 1:
        return 1, out, 0
    ws = _empty((split_k, M, N), torch.float32, x.device)
    return split_k, ws, ws.stride(0)


def _launch_tiles(plain, decode_tuned, main_tuned, args: tuple, flags: dict, M: int, N: int,
                  split_k: int, target: Tensor, out: Tensor) -> Tensor:
    """Launch a tile kernel over a (tiles of [M, N], split_k) grid and reduce the splits.

    Under the interpreter: ``plain`` with the fixed small config; else the autotuned decode set
    (M ≤ 16) or main set. Returns ``out``."""
    if interpreting():
        cfg = INTERPRET_CFG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split_k)
        plain[grid](*args, **flags, **cfg)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)  # noqa: E731
        (decode_tuned if M <= decode.DECODE_M else main_tuned)[grid](*args, **flags)
    if split_k > 1:
        decode.reduce_splits(target, out)
    return out


def launch_dense(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, delta: Tensor,
                 bias_delta: Optional[Tensor] = None, *, split_k: Optional[int] = None) -> Tensor:
    """y ``[M, N]`` = x Wᵀ + b + s ⊙ (x Dᵀ + bias_delta); ``split_k`` forces the split count."""
    M, K = x.shape
    N = weight.shape[0]
    out = _empty((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return out
    weight = _same_dtype(weight, x.dtype, "weight")
    delta = _same_dtype(delta, x.dtype, "delta")
    s, stride_s = _scale(scale, x)
    b, has_b = _bias_args(bias, x)
    bd, has_bd = _bias_args(bias_delta, x)
    split_k, target, so = _splits_and_target(x, out, N, split_k)
    args = (x, weight, delta, b, bd, s, target, M, N, K, decode.m_key(M),
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), delta.stride(0), delta.stride(1),
            stride_s, so, target.stride(-2), target.stride(-1))
    flags = dict(HAS_BIAS=has_b, HAS_BD=has_bd, SPLIT_K=split_k, PREC=dot_precision(x.dtype))
    return _launch_tiles(dense_kernel, decode.dense_decode_tuned, dense_kernel_tuned, args, flags,
                         M, N, split_k, target, out)


def _lowrank_once(x, weight, A, B, b, has_b, bd, has_bd, s, stride_s, variant, split_k, t_pre=None) -> Tensor:
    M, K = x.shape
    N = weight.shape[0]
    R = A.shape[0]
    out = _empty((M, N), x.dtype, x.device)
    prec = dot_precision(x.dtype)
    small = M <= decode.DECODE_M
    fuse = variant == "fused"
    if t_pre is not None:
        # t = x Aᵀ given (a grouped shrink's column slice [M, r]): no shrink launch, one "split"
        # partial read through its strides (stride_tsplit unused with T_SPLITS = 1)
        t, sk, fuse = t_pre, 1, False
        stride_ts, stride_tm, stride_tr = 0, t.stride(0), t.stride(1)
        block_r = shrink_meta(small, R)["BLOCK_R"]
    elif fuse:
        t = s  # unused dummy pointer
        sk, stride_ts, stride_tm, stride_tr = 1, 0, 0, 0
        block_r = max(16, next_pow2(R))  # the fused K loop holds all of t [BLOCK_M, r]
    else:
        # shrink: t [sk, M, R] fp32, one partial per K split (summed by the tile kernel)
        sk = split_k or 1  # an explicit split count (tests) applies to the shrink too
        if split_k is None and _gpu_decode(x):
            sk = decode.shrink_split_for(K)
        t = _empty((sk, M, R), torch.float32, x.device)
        meta = shrink_meta(small, R)
        sgrid = (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, meta["BLOCK_R"]), sk)
        shrink_kernel[sgrid](x, A, s, t, M, R, K, x.stride(0), x.stride(1), A.stride(0), A.stride(1),
                             stride_s, t.stride(0), t.stride(1), t.stride(2), SPLIT_K=sk, PREC=prec, **meta)
        stride_ts, stride_tm, stride_tr = t.stride(0), t.stride(1), t.stride(2)
        block_r = meta["BLOCK_R"]  # the epilogue reads t in the shrink's chunks
    split_k, target, so = _splits_and_target(x, out, N, split_k)
    args = (x, weight, A, B, t, b, bd, s, target, M, N, K, R, decode.m_key(M),
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), A.stride(0), A.stride(1),
            B.stride(0), B.stride(1), stride_ts, stride_tm, stride_tr, stride_s, so, target.stride(-2),
            target.stride(-1))
    flags = dict(HAS_BIAS=has_b, HAS_BD=has_bd, FUSE_SHRINK=fuse, SPLIT_K=split_k, T_SPLITS=sk, PREC=prec,
                 BLOCK_R=block_r)
    return _launch_tiles(lowrank_kernel, decode.lowrank_decode_tuned, lowrank_kernel_tuned, args, flags,
                         M, N, split_k, target, out)


def _choose_variant(x: Tensor, N: int, R: int, run) -> str:
    forced = os.environ.get("RAIN_LOWRANK_VARIANT", "auto").strip().lower()
    if forced in ("split", "fused"):
        return "split" if (forced == "fused" and R > _FUSED_MAX_R) else forced
    if R > _FUSED_MAX_R:
        return "split"
    M, K = x.shape
    key = (next_pow2(M), N, K, R, x.dtype, x.device)
    if key in _variant_cache:
        return _variant_cache[key]
    guess = "fused" if M <= decode.DECODE_M else "split"
    if not _may_time(x):
        return guess
    from triton.testing import do_bench
    times = {v: do_bench(lambda v=v: run(v), warmup=5, rep=20) for v in ("split", "fused")}
    best = min(times, key=times.get)
    _variant_cache[key] = best
    return best


def launch_lowrank(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, lora_A: Tensor,
                   lora_B: Tensor, bias_delta: Optional[Tensor] = None, *,
                   variant: Optional[str] = None, split_k: Optional[int] = None,
                   shrunk: Optional[Tensor] = None) -> Tensor:
    """y ``[M, N]`` = x Wᵀ + b + s ⊙ ((x Aᵀ) Bᵀ + bias_delta); ``variant`` = split | fused forces one.

    ``shrunk`` ``[M, r]``: t = x Aᵀ computed by the caller (the runtime's grouped shrink, any strides;
    cast to float32 if it is not): the ``split`` tile kernel alone runs, reading t."""
    M, K = x.shape
    N = weight.shape[0]
    R = lora_A.shape[0]
    if M == 0 or N == 0:
        return torch.empty((M, N), dtype=x.dtype, device=x.device)
    weight = _same_dtype(weight, x.dtype, "weight")
    A = _same_dtype(lora_A, x.dtype, "lora_A")
    B = _same_dtype(lora_B, x.dtype, "lora_B")
    s, stride_s = _scale(scale, x)
    b, has_b = _bias_args(bias, x)
    bd, has_bd = _bias_args(bias_delta, x)

    def run(v: str) -> Tensor:
        return _lowrank_once(x, weight, A, B, b, has_b, bd, has_bd, s, stride_s, v, split_k)

    if shrunk is not None:
        t = shrunk if shrunk.dtype == torch.float32 else shrunk.float()
        return _lowrank_once(x, weight, A, B, b, has_b, bd, has_bd, s, stride_s, "split", split_k, t)
    if variant is None:
        variant = _choose_variant(x, N, R, run)
    if variant not in ("split", "fused"):
        raise ValueError(f"rain_kernels.ops: variant must be split|fused, got {variant!r}")
    if variant == "fused" and R > _FUSED_MAX_R:
        variant = "split"
    return run(variant)


@torch.library.custom_op("rain::dense_linear", mutates_args=())
def dense_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, delta: Tensor,
                 bias_delta: Optional[Tensor]) -> Tensor:
    """Custom op: y = x Wᵀ + b + scale ⊙ (x Dᵀ + bias_delta) (Triton)."""
    return launch_dense(x, weight, bias, scale, delta, bias_delta)


@dense_linear.register_fake
def _dense_linear_fake(x, weight, bias, scale, delta, bias_delta):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("rain::lowrank_linear", mutates_args=())
def lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, lora_A: Tensor,
                   lora_B: Tensor, bias_delta: Optional[Tensor]) -> Tensor:
    """Custom op: y = x Wᵀ + b + scale ⊙ ((x Aᵀ) Bᵀ + bias_delta) (Triton)."""
    return launch_lowrank(x, weight, bias, scale, lora_A, lora_B, bias_delta)


@lowrank_linear.register_fake
def _lowrank_linear_fake(x, weight, bias, scale, lora_A, lora_B, bias_delta):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("rain::lowrank_linear_shrunk", mutates_args=())
def lowrank_linear_shrunk(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, lora_A: Tensor,
                          lora_B: Tensor, bias_delta: Optional[Tensor], shrunk: Tensor) -> Tensor:
    """Custom op: ``rain::lowrank_linear`` with t = x Aᵀ ``[M, r]`` given (a grouped shrink's slice)."""
    return launch_lowrank(x, weight, bias, scale, lora_A, lora_B, bias_delta, shrunk=shrunk)


@lowrank_linear_shrunk.register_fake
def _lowrank_linear_shrunk_fake(x, weight, bias, scale, lora_A, lora_B, bias_delta, shrunk):
    return x.new_empty((x.shape[0], weight.shape[0]))
