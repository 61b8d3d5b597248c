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

from ._common import main_configs, tile_scale

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
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row-tiles share the W/D column tiles while they sit in L2
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    gsize = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % gsize)
    pid_n = (pid % per_group) // gsize

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # wrapped rows/cols: loads stay in bounds without masks, stores are masked
    rn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)

    k_tiles = tl.cdiv(K, BLOCK_K)
    k_per = tl.cdiv(k_tiles, SPLIT_K) * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = min(K, k_lo + k_per)
    offs_k = tl.arange(0, BLOCK_K)

    s, all_zero, uniform, s_u = tile_scale(s_ptr, stride_s, offs_m, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_base = x_ptr + rm[:, None] * stride_xm
    w_base = w_ptr + rn[None, :] * stride_wn
    d_base = d_ptr + rn[None, :] * stride_dn
    if all_zero:
        for k in range(k_lo, k_hi, BLOCK_K):
            kk = k + offs_k
            km = kk < k_hi
            x = tl.load(x_base + kk[None, :] * stride_xk, mask=km[None, :], other=0.0)
            w = tl.load(w_base + kk[:, None] * stride_wk, mask=km[:, None], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PREC)
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

    n_lim = tl.where(pid_k == 0, N, 0)  # bias terms: split 0 only
    nmask = offs_n < n_lim
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    if HAS_BD:
        bd = tl.load(bd_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
        acc = tl.where(s[:, None] != 0.0, acc + s[:, None] * bd[None, :], acc)

    o_ptrs = out_ptr + pid_k * stride_osplit + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    o_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


dense_kernel_tuned = triton.autotune(configs=main_configs(two_operands=True),
                                     key=["M_KEY", "N", "K"])(dense_kernel)
