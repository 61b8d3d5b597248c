"""Decode path (M ≤ 16): split-K GEMV-style launches of the dense / low-rank kernels.

At decode the layer is memory-bound: every weight byte must be streamed once at full bandwidth.
A ``[16, 64]`` output tile per program with a long ``BLOCK_K`` keeps each program streaming long
contiguous rows of W (and D); when ``cdiv(N, 64)`` programs cannot fill the GPU, K is split in
``SPLIT_K`` ranges (power of two, ~2 programs per SM), each writing an fp32 partial
``[SPLIT_K, M, N]`` that ``reduce_splits`` sums in a fixed order (deterministic, no atomics) and
casts to the output dtype in one pass. Autotuned over ``BLOCK_K`` / stages only; the tile shape is
fixed so the split count can be chosen on the host before launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2, num_sms
from .dense import dense_kernel
from .lowrank import lowrank_kernel

__all__ = ["DECODE_M", "DECODE_BLOCK_M", "DECODE_BLOCK_N", "split_k_for", "shrink_split_for", "reduce_splits",
           "dense_decode_tuned", "lowrank_decode_tuned"]

DECODE_M = 16          # M ≤ DECODE_M takes this path on CUDA
DECODE_BLOCK_M = 16    # tl.dot needs ≥ 16 rows; rows beyond M are masked
DECODE_BLOCK_N = 64


def _configs(two_operands: bool) -> list[triton.Config]:
    sets = ((128, 4, 4), (128, 4, 3), (256, 8, 2), (64, 4, 6)) if two_operands else \
           ((256, 4, 3), (128, 4, 4), (256, 8, 4), (128, 4, 6))
    return [triton.Config(dict(BLOCK_M=DECODE_BLOCK_M, BLOCK_N=DECODE_BLOCK_N, BLOCK_K=bk, GROUP_M=1),
                          num_warps=w, num_stages=st) for bk, w, st in sets]


dense_decode_tuned = triton.autotune(
    configs=_configs(True), key=["M_KEY", "N", "K"])(dense_kernel)
lowrank_decode_tuned = triton.autotune(
    configs=_configs(False), key=["M_KEY", "N", "K", "R", "FUSE_SHRINK"])(lowrank_kernel)


def shrink_split_for(K: int) -> int:
    """Split count of the low-rank shrink t = x Aᵀ at decode: K ranges of ≥ 512, at most 16."""
    sk = max(1, min(16, K // 512))
    return 1 << (sk.bit_length() - 1)


def split_k_for(N: int, K: int, device: torch.device | None = None, sms: int | None = None) -> int:
    """Split count so that cdiv(N, 64) · SPLIT_K ≈ 2 programs per SM, each K range ≥ 512.

    ``sms``: the multiprocessor count (default: ``device``'s)."""
    tiles = triton.cdiv(N, DECODE_BLOCK_N)
    if sms is None:
        sms = num_sms(device.index if device is not None and device.index is not None else 0)
    want = max(1, (2 * sms) // tiles)
    split = 1
    while split * 2 <= min(want, 16) and K // (split * 2) >= 512:
        split *= 2
    return split


@triton.jit
def _reduce_kernel(ws_ptr, out_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + i * MN + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def reduce_splits(ws: torch.Tensor, out: torch.Tensor) -> None:
    """out ``[M, N]`` (contiguous) = Σ_s ws ``[S, M, N]`` (fp32, contiguous), in a fixed order."""
    S, M, N = ws.shape
    MN = M * N
    block = 1024
    _reduce_kernel[(triton.cdiv(MN, block),)](ws, out, MN, SPLIT_K=S, BLOCK=block)


def m_key(M: int) -> int:
    """Autotune bucket for M (powers of two)."""
    return next_pow2(M)
