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
           "main_configs", "tile_scale", "INTERPRET_CFG"]

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
    for bm, bn, bk, w, st in ((128, 128, 64, 8, 3), (64, 128, 64, 8, 4), (128, 64, 64, 8, 4),
                              (64, 64, 128, 4, 3), (32, 128, 128, 8, 4)):
        out.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8),
                                 num_warps=w, num_stages=st if not two_operands else max(2, st - 1)))
    return out


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


def tl_dtype(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]
