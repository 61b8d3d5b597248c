"""Benchmark of the RAIN linear against merged weights and unfused baselines.

    python bench/kernels_bench.py [--quick] [--models 7b,14b] [--storage lowrank,dense] [--rank 64]
                            [--m 1,4,16,...] [--threads N] [--graphs]

Per Qwen2.5-7B / -14B linear shape (q, k/v, o, gate/up, down; ``[out, in]``) and batch rows M,
times y = x Wᵀ + b + s ⊙ (x Dᵀ) (dense D) or s ⊙ ((x Aᵀ) Bᵀ) (low rank, rank r):

- ``merged``: ``F.linear(x, W + λD)`` — the floor (what a merged checkpoint costs);
- ``addmm``: torch GEMM then ``addmm`` of the delta product (``F.linear`` + ``torch.addmm``);
- ``peft``: PEFT-style unfused ``base(x) + lora_B(lora_A(x)) * s`` (dense: ``+ (x Dᵀ) * s``);
- ``ours``: ``rain_kernels.rain_linear`` with one mixed λ per row (Triton on CUDA,
  the PyTorch path on CPU), and ``ours-u`` with one uniform λ for the whole batch.

Ratios are time / merged; ``GB/s`` is the bytes ours must read (W, the delta, x, y) over its time,
reported at decode (M ≤ 16). On CUDA: bf16, ``triton.testing.do_bench`` (L2 flushed), each call
launched from Python, or with ``--graphs`` captured once in a CUDA graph and replayed (GPU time
without launch overhead: at decode the base GEMV takes microseconds, about what launching two or
three Triton kernels from Python costs). On CPU: float32, a smaller M set, the PyTorch path,
median wall time. Prints a markdown table to stdout.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from rain_kernels import rain_linear, triton_available

# (hidden, intermediate, n_heads, n_kv_heads, head_dim)
MODELS = {"7b": (3584, 18944, 28, 4, 128), "14b": (5120, 13824, 40, 8, 128)}
M_GPU = (1, 4, 16, 64, 256, 1024, 4096)
M_CPU = (1, 4, 16, 64, 256)


def linear_shapes(model: str) -> list[tuple[str, int, int]]:
    """(role, out, in) of the distinct linear shapes of one decoder layer."""
    h, inter, nh, nkv, hd = MODELS[model]
    return [("q", nh * hd, h), ("k/v", nkv * hd, h), ("o", h, nh * hd), ("gate/up", inter, h),
            ("down", h, inter)]


def _timer(device: torch.device, reps: int, graphs: bool = False) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":
        from triton.testing import do_bench

        if not graphs:
            return lambda fn: do_bench(fn, warmup=25, rep=100)

        def graph_time(fn):
            # warm up outside the capture (autotuning, the low-rank variant choice), then time
            # replays: GPU time without the host's launch overhead, as a graph-captured decode
            # step (vLLM, torch.compile "reduce-overhead") would run it
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            return do_bench(g.replay, warmup=25, rep=100)

        return graph_time

    def cpu_time(fn):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    return cpu_time


def bench_one(N: int, K: int, M: int, storage: str, rank: int, dtype: torch.dtype,
              device: torch.device, timer) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s, sc=1.0: (sc * torch.randn(*s, generator=g)).to(device=device, dtype=dtype)  # noqa: E731
    x = mk(M, K)
    W = mk(N, K, sc=K**-0.5)
    b = mk(N, sc=0.1)
    lam = 0.8
    s_mixed = (0.2 + 1.6 * torch.rand(M, generator=g)).to(device)
    s_mixed[1::4] = 0.0  # a λ = 0 row in every 4 (row 0 keeps λ ≠ 0, so M = 1 does the delta)
    s_uni = torch.full((M,), lam, device=device)
    if storage == "lowrank":
        A, B, D = mk(rank, K, sc=K**-0.5), mk(N, rank, sc=0.05), None
        merged = (W.float() + lam * (B.float() @ A.float())).to(dtype)
        delta_bytes = (A.numel() + B.numel()) * A.element_size()
    else:
        A = B = None
        D = mk(N, K, sc=0.01 * K**-0.5)
        merged = (W.float() + lam * D.float()).to(dtype)
        delta_bytes = D.numel() * D.element_size()

    def f_merged():
        return F.linear(x, merged, b)

    def f_addmm():
        y = F.linear(x, W, b)
        if D is not None:
            return torch.addmm(y, x * s_mixed[:, None].to(dtype), D.t())
        t = F.linear(x, A) * s_mixed[:, None].to(dtype)
        return torch.addmm(y, t, B.t())

    def f_peft():
        base = F.linear(x, W, b)
        upd = F.linear(x, D) if D is not None else F.linear(F.linear(x, A), B)
        return base + upd * s_mixed[:, None].to(dtype)

    def f_ours():
        return rain_linear(x, W, b, s_mixed, delta=D, lora_A=A, lora_B=B)

    def f_ours_u():
        return rain_linear(x, W, b, s_uni, delta=D, lora_A=A, lora_B=B)

    out = {}
    for name, fn in (("merged", f_merged), ("addmm", f_addmm), ("peft", f_peft), ("ours", f_ours),
                     ("ours-u", f_ours_u)):
        out[name] = timer(fn)
    w_bytes = W.numel() * W.element_size()
    io_bytes = (M * K + M * N) * x.element_size()
    out["gbps"] = (w_bytes + delta_bytes + io_bytes) / (out["ours"] * 1e-3) / 1e9
    out["gbps_merged"] = (w_bytes + io_bytes) / (out["merged"] * 1e-3) / 1e9
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="7B only, fewer M and shapes, few reps")
    p.add_argument("--models", default="7b,14b")
    p.add_argument("--storage", default="lowrank,dense")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--m", default=None, help="comma-separated M values (default per device)")
    p.add_argument("--roles", default=None, help="comma-separated roles, e.g. q,down")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--reps", type=int, default=None, help="CPU timing repetitions")
    p.add_argument("--graphs", action="store_true",
                   help="CUDA: time CUDA-graph replays of every variant (no host launch overhead)")
    a = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if a.threads:
        torch.set_num_threads(a.threads)
    models = ["7b"] if a.quick else [m.strip() for m in a.models.split(",")]
    if a.m:
        ms = tuple(int(v) for v in a.m.split(","))
    elif a.quick:
        ms = (1, 16, 256) if cuda else (1, 16, 64)
    else:
        ms = M_GPU if cuda else M_CPU
    roles = set(a.roles.split(",")) if a.roles else ({"q", "k/v", "down"} if a.quick else None)
    reps = a.reps or (5 if a.quick else 9)
    timer = _timer(device, reps, graphs=a.graphs and cuda)

    timing = (("triton do_bench of CUDA-graph replays (ms)" if a.graphs else "triton do_bench (ms)")
              if cuda else f"median of {reps} (ms)")
    if cuda:
        dev = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
        path = "Triton" if triton_available() else "PyTorch (triton missing)"
    else:
        dev = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        path = "PyTorch path (no GPU: CPU numbers measure the plain PyTorch fallback)"
    print(f"# rain_linear benchmark\n\ndevice: {dev}; dtype: {str(dtype).replace('torch.', '')}; "
          f"ours = {path}; torch {torch.__version__}; timing: "
          f"{timing}\n")
    print("| model | module | out×in | storage | M | merged ms | addmm × | peft × | ours × | "
          "ours-u × | ours GB/s (decode) |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for model in models:
        for role, N, K in linear_shapes(model):
            if roles and role not in roles:
                continue
            for storage in a.storage.split(","):
                st = f"lowrank r={a.rank}" if storage == "lowrank" else "dense"
                for M in ms:
                    r = bench_one(N, K, M, storage, a.rank, dtype, device, timer)
                    base = r["merged"]
                    bw = f"{r['gbps']:.0f} (merged {r['gbps_merged']:.0f})" if M <= 16 else ""
                    print(f"| {model} | {role} | {N}×{K} | {st} | {M} | {base:.3f} | "
                          f"{r['addmm'] / base:.2f} | {r['peft'] / base:.2f} | {r['ours'] / base:.2f} | "
                          f"{r['ours-u'] / base:.2f} | {bw} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
