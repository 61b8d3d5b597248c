"""Low-rank Triton kernels: y = x Wᵀ + b + s ⊙ ((x Aᵀ) Bᵀ + bias_delta).

Shapes: x ``[M, K]``, W ``[N, K]``, A ``[r, K]`` (PEFT lora_A), B ``[N, r]`` (PEFT lora_B),
s ``[M]`` float32 (device pointer), t ``[T_SPLITS, M, r]`` float32, y ``[M, N]``.

Two variants, chosen per shape in ``ops.py``:

- ``split``: ``shrink_kernel`` computes t = x Aᵀ (fp32 accumulate; for small M split over K,
  each split storing its own partial ``t[split]``: no atomics, no zeroing launch, the same bits
  every run), then ``lowrank_kernel`` (FUSE_SHRINK=False) runs the base GEMM tile and adds
  (s ⊙ Σ_split t[split]) Bᵀ in its epilogue (the partials summed in a fixed order while loading)
  before the single store (s ⊙ t is formed in fp32, then cast to the input dtype for the dot).
- ``fused``: ``lowrank_kernel`` (FUSE_SHRINK=True) accumulates x Aᵀ next to x Wᵀ in the same K
  loop (one launch; the shrink is recomputed by every column tile, which only pays when M is small
  and the A re-reads hit L2). Needs r ≤ 128.

A tile whose rows all have λ = 0 skips the shrink and the epilogue (device-side branch); in a
mixed tile the update has its own accumulator and rows with λ = 0 keep the base exactly, even
if A or B held a NaN (the PyTorch path's ``torch.where`` gives the same).
Split-K (``SPLIT_K > 1``, decode) writes fp32 partials to a workspace ``[SPLIT_K, M, N]``; the
epilogue of the ``split`` variant and the bias terms go to split 0, the fused variant adds each
split's partial (x_k A_kᵀ) Bᵀ (linear, so the sum is exact up to rounding).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import base_loop, k_range, main_configs, store_tile, tile_coords, tile_scale

__all__ = ["shrink_kernel", "lowrank_kernel", "lowrank_kernel_tuned"]


@triton.jit
def shrink_kernel(
    x_ptr, a_ptr, s_ptr, t_ptr,
    M, R, K,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_s, stride_tsplit, stride_tm, stride_tr,
    SPLIT_K: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """t[split, M, R] (fp32) = x[:, K range of split] A[:, same]ᵀ; grid (cdiv(M, BLOCK_M),
    cdiv(R, BLOCK_R), SPLIT_K). Σ_split t[split] = x Aᵀ (summed by the consumer)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = offs_m % M
    rr = offs_r % R
    k_lo, k_hi = k_range(K, pid_k, SPLIT_K, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    s, all_zero, uniform, s_u = tile_scale(s_ptr, stride_s, offs_m, M)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if not all_zero:
        for k in range(k_lo, k_hi, BLOCK_K):
            kk = k + offs_k
            km = kk < k_hi
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=km[None, :], other=0.0)
            a = tl.load(a_ptr + rr[None, :] * stride_ar + kk[:, None] * stride_ak,
                        mask=km[:, None], other=0.0)
            acc = tl.dot(x, a, acc, input_precision=PREC)
    t_ptrs = t_ptr + pid_k * stride_tsplit + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
    t_mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    tl.store(t_ptrs, acc, mask=t_mask)


@triton.jit
def lowrank_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, t_ptr, bias_ptr, bd_ptr, s_ptr, out_ptr,
    M, N, K, R, M_KEY,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_tsplit, stride_tm, stride_tr, stride_s, stride_osplit, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, HAS_BD: tl.constexpr, FUSE_SHRINK: tl.constexpr,
    SPLIT_K: tl.constexpr, T_SPLITS: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_k = tl.program_id(1)
    offs_m, offs_n, rm, rn, k_lo, k_hi = tile_coords(M, N, K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)

    s, all_zero, uniform, s_u = tile_scale(s_ptr, stride_s, offs_m, M)
    x_base = x_ptr + rm[:, None] * stride_xm
    w_base = w_ptr + rn[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    if all_zero:
        acc = base_loop(acc, x_base, w_base, stride_xk, stride_wk, k_lo, k_hi, PREC, BLOCK_K)
    elif FUSE_SHRINK:
        # one K loop: acc += x Wᵀ and t += x Aᵀ (A tile [BLOCK_K, BLOCK_R], BLOCK_R ≥ R)
        offs_k = tl.arange(0, BLOCK_K)
        rmask = offs_r < R
        a_base = a_ptr + offs_r[None, :] * stride_ar
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            kk = k + offs_k
            km = kk < k_hi
            x = tl.load(x_base + kk[None, :] * stride_xk, mask=km[None, :], other=0.0)
            w = tl.load(w_base + kk[:, None] * stride_wk, mask=km[:, None], other=0.0)
            a = tl.load(a_base + kk[:, None] * stride_ak, mask=km[:, None] & rmask[None, :], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PREC)
            t = tl.dot(x, a, t, input_precision=PREC)
        bt = tl.load(b_ptr + rn[None, :] * stride_bn + offs_r[:, None] * stride_br,
                     mask=rmask[:, None], other=0.0)
        ts = tl.where(s[:, None] != 0.0, s[:, None] * t, 0.0)  # λ folded into t (fp32)
        upd = tl.dot(ts.to(bt.dtype), bt, input_precision=PREC)
        acc = tl.where(s[:, None] != 0.0, acc + upd, acc)
    else:
        acc = base_loop(acc, x_base, w_base, stride_xk, stride_wk, k_lo, k_hi, PREC, BLOCK_K)
        if pid_k == 0:
            # epilogue: acc += (s ⊙ t) Bᵀ, t [BLOCK_M, r] read in BLOCK_R chunks, λ folded into t
            # in fp32. The update has its own accumulator so rows with λ = 0 keep acc exactly,
            # whatever B holds (0 · NaN would otherwise reach them through the dot)
            upd = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in tl.range(0, R, BLOCK_R, num_stages=1):  # not pipelined: T_SPLITS loads each
                rr = r0 + offs_r
                rmask = rr < R
                t_base = t_ptr + rm[:, None] * stride_tm + rr[None, :] * stride_tr
                tt = tl.load(t_base, mask=rmask[None, :], other=0.0)
                for sp in tl.static_range(1, T_SPLITS):  # the shrink's K splits, in order
                    tt += tl.load(t_base + sp * stride_tsplit, mask=rmask[None, :], other=0.0)
                bt = tl.load(b_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br,
                             mask=rmask[:, None], other=0.0)
                ts = tl.where(s[:, None] != 0.0, s[:, None] * tt, 0.0)
                upd = tl.dot(ts.to(bt.dtype), bt, upd, input_precision=PREC)
            acc = tl.where(s[:, None] != 0.0, acc + upd, acc)

    store_tile(acc, s, offs_m, offs_n, pid_k, bias_ptr, bd_ptr, out_ptr, M, N,
               stride_osplit, stride_om, stride_on, HAS_BIAS, HAS_BD)


lowrank_kernel_tuned = triton.autotune(
    configs=main_configs(two_operands=False), key=["M_KEY", "N", "K", "R", "FUSE_SHRINK"])(lowrank_kernel)
