"""Shared helpers of the Triton kernels: interpreter detection, configs, tile-level λ logic.

Every kernel reads λ from a device tensor (``scale_ptr``, one float32 per row, stride may be 0)
so a CUDA graph captured once stays valid when λ changes; nothing about λ is a ``tl.constexpr``.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["interpreting", "tl_dtype", "dot_precision", "next_pow2", "num_sms",
           "main_configs", "SM90_SMEM_OPTIN", "tile_scale", "tile_coords", "k_range", "store_tile", "base_loop",
           "INTERPRET_CFG"]

# One small fixed config for TRITON_INTERPRET=1 (CPU tests): no autotuning there.
INTERPRET_CFG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on the CPU through numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs follow ``torch.backends.cuda.matmul.allow_tf32``."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@functools.lru_cache(maxsize=8)
def num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 8
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def main_configs(two_operands: bool) -> list[triton.Config]:
    """A small autotune set for M > 16 (prefill / batched decode), Hopper/Ampere friendly.

    ``two_operands``: the dense kernel streams W and D, which doubles shared memory per stage.
    """
    out = []
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); 8 warps on the big tiles keeps the two
    # fp32 accumulators of the dense kernel in registers (checked with ptxas for sm_90a)
    # A config too big for the device's shared memory is skipped by Triton's autotuner
    # (OutOfResources); the last, small one is what fits every kernel when the inputs are fp32.
    for bm, bn, bk, w, st in ((128, 128, 64, 8, 3), (64, 128, 64, 8, 4), (128, 64, 64, 8, 4),
                              (64, 64, 128, 4, 3), (32, 128, 64, 8, 4), (64, 64, 64, 4, 2)):
        out.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8),
                                 num_warps=w, num_stages=st if not two_operands else max(2, st - 1)))
    return out


SM90_SMEM_OPTIN = 227 * 1024  # H100 / H200 shared memory per program (opt-in), bytes


@triton.jit
def tile_coords(M, N, K, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile and K range, for a grid (tiles of [M, N], SPLIT_K).

    Grouped ordering: GROUP_M row tiles run next to each other over the same column tiles, so
    the W (and D) column tiles they share are still in L2. Returns ``offs_m`` ``[BLOCK_M]`` and
    ``offs_n`` ``[BLOCK_N]`` (for masks and stores), ``rm`` / ``rn`` (the same offsets wrapped
    into range, so loads need no row / column mask) and ``[k_lo, k_hi)``, this split's K range
    (whole BLOCK_K tiles; the last split may be short or empty).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    gsize = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % gsize)
    pid_n = (pid % per_group) // gsize

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M
    rn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    k_lo, k_hi = k_range(K, pid_k, SPLIT_K, BLOCK_K)
    return offs_m, offs_n, rm, rn, k_lo, k_hi


@triton.jit
def k_range(K, pid_k, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[k_lo, k_hi)`` of split ``pid_k`` of SPLIT_K over K: whole BLOCK_K tiles each, the last
    split short or empty."""
    k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * k_per
    return k_lo, min(K, k_lo + k_per)


@triton.jit
def tile_scale(scale_ptr, stride_s, offs_m, M):
    """Load λ for the rows of a tile; also return (all zero?, uniform?, the shared value).

    Rows beyond M get λ = 0 and do not count towards uniformity.
    """
    mask = offs_m < M
    s = tl.load(scale_ptr + offs_m * stride_s, mask=mask, other=0.0).to(tl.float32)
    big = float("inf")
    s_min = tl.min(tl.where(mask, s, big), axis=0)
    s_max = tl.max(tl.where(mask, s, -big), axis=0)
    a_max = tl.max(tl.abs(s), axis=0)
    return s, a_max == 0.0, s_min == s_max, s_max


@triton.jit
def base_loop(acc, x_base, w_base, stride_xk, stride_wk, k_lo, k_hi,
              PREC: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc ``[BLOCK_M, BLOCK_N]`` += x[rows, k_lo:k_hi] · W[cols, k_lo:k_hi]ᵀ (fp32 accumulate).

    ``x_base`` / ``w_base``: pointer blocks ``[BLOCK_M, 1]`` and ``[1, BLOCK_N]`` at k = 0.
    """
    offs_k = tl.arange(0, BLOCK_K)
    for k in range(k_lo, k_hi, BLOCK_K):
        kk = k + offs_k
        km = kk < k_hi
        x = tl.load(x_base + kk[None, :] * stride_xk, mask=km[None, :], other=0.0)
        w = tl.load(w_base + kk[:, None] * stride_wk, mask=km[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PREC)
    return acc


@triton.jit
def store_tile(acc, s, offs_m, offs_n, pid_k, bias_ptr, bd_ptr, out_ptr, M, N,
               stride_osplit, stride_om, stride_on, HAS_BIAS: tl.constexpr, HAS_BD: tl.constexpr):
    """Epilogue shared by the dense and low-rank kernels: add the bias terms, store once.

    acc ``[BLOCK_M, BLOCK_N]`` fp32 (x Wᵀ + the delta term), s ``[BLOCK_M]`` the rows' λ.
    y = acc + b + s ⊙ bias_delta, with rows whose λ is 0 left exactly acc + b. Under split-K only
    split 0 adds the bias terms (the others write plain partial sums to ``out_ptr``'s workspace
    slice ``pid_k``). The store is masked to the [M, N] bounds and casts to ``out_ptr``'s dtype.
    """
    n_lim = tl.where(pid_k == 0, N, 0)
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


def tl_dtype(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]
