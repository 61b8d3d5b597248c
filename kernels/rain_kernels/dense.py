"""Dense-delta Triton kernel: y = x Wᵀ + b + s ⊙ (x Dᵀ + bias_delta), one pass over K.

Shapes: x ``[M, K]``, W and D ``[N, K]`` (``[out, in]``), s ``[M]`` float32 (device pointer),
b / bias_delta ``[N]``, y ``[M, N]``. fp32 accumulation for bf16 / fp16 / fp32 inputs.

Each ``[BLOCK_M, BLOCK_N]`` tile looks at the λ of its rows at run time and takes one of three
loops (a device-side branch, so a captured CUDA graph stays valid for any λ):

- every λ in the tile is 0: the base dot only (D is never read);
- every λ in the tile is the same value λ: W + λD is folded per tile in fp32, rounded to the input
  dtype (exactly what merged weights hold) and fed to one dot;
- mixed λ: two accumulators (x Wᵀ and x Dᵀ) in the same K loop, combined as acc_w + s ⊙ acc_d in
  the epilogue; rows with λ = 0 keep acc_w untouched.

Split-K (``SPLIT_K > 1``, the small-M decode path in ``decode.py``) writes fp32 partial sums to a
workspace ``[SPLIT_K, M, N]``; bias terms are added by split 0 only; ``decode.reduce_splits`` sums.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import base_loop, main_configs, store_tile, tile_coords, tile_scale

__all__ = ["dense_kernel", "dense_kernel_tuned"]


@triton.jit
def dense_kernel(
    x_ptr, w_ptr, d_ptr, bias_ptr, bd_ptr, s_ptr, out_ptr,
    M, N, K, M_KEY,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_dn, stride_dk, stride_s,
    stride_osplit, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, HAS_BD: tl.constexpr, SPLIT_K: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_k = tl.program_id(1)
    offs_m, offs_n, rm, rn, k_lo, k_hi = tile_coords(M, N, K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)

    s, all_zero, uniform, s_u = tile_scale(s_ptr, stride_s, offs_m, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_base = x_ptr + rm[:, None] * stride_xm
    w_base = w_ptr + rn[None, :] * stride_wn
    d_base = d_ptr + rn[None, :] * stride_dn
    if all_zero:
        acc = base_loop(acc, x_base, w_base, stride_xk, stride_wk, k_lo, k_hi, PREC, BLOCK_K)
    elif uniform:
        for k in range(k_lo, k_hi, BLOCK_K):
            kk = k + offs_k
            km = kk < k_hi
            x = tl.load(x_base + kk[None, :] * stride_xk, mask=km[None, :], other=0.0)
            w = tl.load(w_base + kk[:, None] * stride_wk, mask=km[:, None], other=0.0)
            d = tl.load(d_base + kk[:, None] * stride_dk, mask=km[:, None], other=0.0)
            w_eff = (w.to(tl.float32) + s_u * d.to(tl.float32)).to(w.dtype)
            acc = tl.dot(x, w_eff, acc, input_precision=PREC)
    else:
        acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            kk = k + offs_k
            km = kk < k_hi
            x = tl.load(x_base + kk[None, :] * stride_xk, mask=km[None, :], other=0.0)
            w = tl.load(w_base + kk[:, None] * stride_wk, mask=km[:, None], other=0.0)
            d = tl.load(d_base + kk[:, None] * stride_dk, mask=km[:, None], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PREC)
            acc_d = tl.dot(x, d, acc_d, input_precision=PREC)
        acc = tl.where(s[:, None] != 0.0, acc + s[:, None] * acc_d, acc)

    store_tile(acc, s, offs_m, offs_n, pid_k, bias_ptr, bd_ptr, out_ptr, M, N,
               stride_osplit, stride_om, stride_on, HAS_BIAS, HAS_BD)


dense_kernel_tuned = triton.autotune(configs=main_configs(two_operands=True),
                                     key=["M_KEY", "N", "K"])(dense_kernel)
