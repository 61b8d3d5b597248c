"""Static resource audit of the Triton kernels for Hopper (sm_90a), no GPU needed.

Every config the launchers can pick (the autotune sets in ``dense.py``, ``lowrank.py``,
``decode.py`` and the fixed shrink / reduce launches in ``ops.py``) is compiled ahead of time with
the argument specialisation Triton's JIT gives a real launch (integer arguments equal to 1 become
constants, the others divisible by 16 and every pointer get ``tt.divisibility = 16``), and the
compiler's outputs are read:

- ``regs`` / ``stack`` / ``local``: registers per thread, stack frame and local memory bytes
  (``cuobjdump --dump-resource-usage``); ``spill_ops``: ``LDL`` + ``STL`` instructions in SASS;
- ``smem``: shared memory bytes per program (the launch's dynamic allocation);
- ``wgmma`` / ``mma``: Hopper warp-group MMA (``HGMMA``) and Ampere-style ``HMMA`` instructions;
- ``async_copies``: ``cp.async`` global→shared copies in the TTGIR (the K loop is software
  pipelined over ``num_stages`` buffers; 0 means every load waits for memory);
- ``narrow_copies``: SASS ``LDGSTS`` narrower than 16 bytes (a memory-bound decode kernel
  streams W and D at full bandwidth only with 16-byte copies).

A config whose shared memory exceeds the device's is skipped by Triton's autotuner
(``OutOfResources``), so it is reported as "skipped", not as a problem; what must hold is that
every kernel of every path keeps at least one config that fits, and (for bf16 / fp16, the dtypes
the speed goals are about) that no config that fits spills or runs an unpipelined K loop.

The specialisation matters: compiled with plain ``i32`` strides (no "stride == 1"), the dense
128×128 tile needed 255 registers with spills and no pipelined loads; with the JIT's
specialisation it is 188 registers, no spills, pipelined. ``python -m rain_kernels.audit``
prints the table (``bench/RESULTS.md`` holds one); ``tests/test_kernels_aot.py`` asserts on it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable

import triton

from . import decode
from ._common import SM90_SMEM_OPTIN
from .dense import dense_kernel, dense_kernel_tuned
from .lowrank import lowrank_kernel, lowrank_kernel_tuned, shrink_kernel
from .ops import shrink_meta

__all__ = ["KernelReport", "LaunchSpec", "audit", "launch_specs", "compile_sm90", "format_table",
           "SM90_SMEM_LIMIT"]

SM90_SMEM_LIMIT = SM90_SMEM_OPTIN  # opt-in shared memory per block on H100 / H200 (bytes)
_SM90_SMS = 132                # H100 SXM / H200: what split_k_for would see

_PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


@dataclasses.dataclass
class LaunchSpec:
    """One compile: a kernel, its pointer types, the integer arguments of a representative launch,
    the constexpr flags and the config (``num_warps`` / ``num_stages``)."""

    name: str
    fn: Any                       # a @triton.jit function
    ptrs: dict[str, str]          # pointer argument → Triton type (``*bf16`` …)
    ints: dict[str, int]          # integer argument → value of a representative launch
    consts: dict[str, Any]        # constexpr arguments
    num_warps: int
    num_stages: int
    main_loop: bool = True        # has a K loop that should be pipelined


@dataclasses.dataclass
class KernelReport:
    name: str
    config: str
    regs: int
    stack: int
    local: int
    spill_ops: int
    smem: int
    wgmma: int
    mma: int
    async_copies: int
    narrow_copies: int
    main_loop: bool

    @property
    def fits(self) -> bool:
        """Launchable on sm_90: shared memory within the opt-in limit (else the autotuner skips it)."""
        return self.smem <= SM90_SMEM_LIMIT

    @property
    def problems(self) -> list[str]:
        """What makes this launchable config slow on sm_90 (empty when fine, or when skipped)."""
        out = []
        if not self.fits:
            return out
        if self.spill_ops or self.local:
            out.append(f"spills ({self.spill_ops} LDL/STL, {self.local} B local)")
        if self.narrow_copies:
            out.append(f"{self.narrow_copies} global→shared copies narrower than 16 B")
        if self.main_loop and self.async_copies == 0:
            out.append("K loop not pipelined (no async copies)")
        return out


def _bin(tool: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def compile_sm90(spec: LaunchSpec):
    """Compile ``spec`` for sm_90a with the JIT's specialisation; returns Triton's compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = spec.fn.arg_names
    sig: dict[str, str] = {}
    consts = dict(spec.consts)
    attrs: dict[tuple[int], list] = {}
    for n in names:
        if n in spec.ptrs:
            sig[n] = spec.ptrs[n]
            attrs[(names.index(n),)] = [["tt.divisibility", 16]]
        elif n in spec.ints:
            v = int(spec.ints[n])
            if v == 1:                   # Triton specialises integer arguments equal to 1
                consts[n] = 1
                sig[n] = "constexpr"
            else:
                sig[n] = "i32"
                if v % 16 == 0:
                    attrs[(names.index(n),)] = [["tt.divisibility", 16]]
        elif n in consts:
            sig[n] = "constexpr"
        else:
            raise ValueError(f"rain_kernels.audit: {spec.name}: no value for argument {n!r}")
    src = ASTSource(fn=spec.fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))


def _report(spec: LaunchSpec) -> KernelReport:
    k = compile_sm90(spec)
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", cubin],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "--dump-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    field = lambda key: int(re.search(rf"\b{key}:(\d+)", res).group(1))  # noqa: E731
    ops = lambda op: len(re.findall(rf"\b{op}\b", sass))  # noqa: E731
    cfg = ", ".join(f"{k_}={v}" for k_, v in spec.consts.items() if k_.startswith("BLOCK") or
                    k_ in ("SPLIT_K", "FUSE_SHRINK", "T_SPLITS"))
    return KernelReport(
        name=spec.name, config=f"{cfg}, warps={spec.num_warps}, stages={spec.num_stages}",
        regs=field("REG"), stack=field("STACK"), local=field("LOCAL"),
        spill_ops=ops("LDL") + ops("STL"), smem=int(k.metadata.shared),
        wgmma=len(re.findall(r"\bHGMMA", sass)), mma=len(re.findall(r"\bHMMA", sass)),
        async_copies=k.asm["ttgir"].count("async_copy_global_to_local"),
        narrow_copies=len(re.findall(r"\bLDGSTS(?![.\w]*\.128\b)[.\w]*", sass)), main_loop=spec.main_loop)


def _cfg(c: triton.Config) -> tuple[dict, int, int]:
    return dict(c.kwargs), c.num_warps, c.num_stages


def launch_specs(dtypes: tuple[str, ...] = ("bf16",), rank: int = 64) -> list[LaunchSpec]:
    """Every config the launchers can run, at Qwen2.5-7B-like shapes.

    Prefill: M = 4096, N = K = 3584 (q / o). Decode (M = 4): the ``down`` shape N = 3584,
    K = 18944 with the split count ``split_k_for`` gives on 132 SMs. Low rank r = ``rank``.
    """
    specs: list[LaunchSpec] = []
    R = rank
    for dt in dtypes:
        p = _PTR[dt]
        out_split = "*fp32"
        for label, M, N, K, tuned in (("prefill", 4096, 3584, 3584, False), ("decode", 4, 3584, 18944, True)):
            split = decode.split_k_for(N, K, sms=_SM90_SMS) if tuned else 1
            out_t = out_split if split > 1 else p
            common = dict(M=M, N=N, K=K, M_KEY=decode.next_pow2(M), stride_xm=K, stride_xk=1,
                          stride_wn=K, stride_wk=1, stride_s=1,
                          stride_osplit=(M * N if split > 1 else 0), stride_om=N, stride_on=1)
            flags = dict(HAS_BIAS=True, HAS_BD=True, SPLIT_K=split, PREC="tf32")
            dense_cfgs = decode.dense_decode_tuned.configs if tuned else dense_kernel_tuned.configs
            for c in dense_cfgs:
                kw, w, st = _cfg(c)
                specs.append(LaunchSpec(
                    f"dense {label} {dt}", dense_kernel,
                    dict(x_ptr=p, w_ptr=p, d_ptr=p, bias_ptr=p, bd_ptr=p, s_ptr="*fp32", out_ptr=out_t),
                    dict(common, stride_dn=K, stride_dk=1), dict(flags, **kw), w, st))
            lr_cfgs = decode.lowrank_decode_tuned.configs if tuned else lowrank_kernel_tuned.configs
            sk = decode.shrink_split_for(K) if tuned else 1  # the shrink's K splits (split variant)
            shrink = shrink_meta(tuned, R)
            shrink_warps = shrink.pop("num_warps")
            for fuse in (False, True):
                br = max(16, decode.next_pow2(R)) if fuse else shrink["BLOCK_R"]
                for c in lr_cfgs:
                    kw, w, st = _cfg(c)
                    specs.append(LaunchSpec(
                        f"lowrank-{'fused' if fuse else 'split'} {label} {dt}", lowrank_kernel,
                        dict(x_ptr=p, w_ptr=p, a_ptr=p, b_ptr=p, t_ptr="*fp32", bias_ptr=p, bd_ptr=p,
                             s_ptr="*fp32", out_ptr=out_t),
                        dict(common, R=R, stride_ar=K, stride_ak=1, stride_bn=R, stride_br=1,
                             stride_tsplit=0 if fuse else M * R, stride_tm=0 if fuse else R,
                             stride_tr=0 if fuse else 1),
                        dict(flags, HAS_BD=False, FUSE_SHRINK=fuse, T_SPLITS=1 if fuse else sk, BLOCK_R=br,
                             **kw), w, st))
            # the shrink of the split variant, as ops._lowrank_once launches it (Triton's default
            # num_stages, 3)
            specs.append(LaunchSpec(
                f"shrink {label} {dt}", shrink_kernel,
                dict(x_ptr=p, a_ptr=p, s_ptr="*fp32", t_ptr="*fp32"),
                dict(M=M, R=R, K=K, stride_xm=K, stride_xk=1, stride_ar=K, stride_ak=1, stride_s=1,
                     stride_tsplit=M * R, stride_tm=R, stride_tr=1),
                dict(SPLIT_K=sk, PREC="tf32", **shrink), shrink_warps, 3))
        # the split-K reduce of the decode path (no K loop, nothing to pipeline)
        specs.append(LaunchSpec(f"reduce decode {dt}", decode._reduce_kernel,
                                dict(ws_ptr="*fp32", out_ptr=p), dict(MN=4 * 3584),
                                dict(SPLIT_K=4, BLOCK=1024), 4, 3, main_loop=False))
    return specs


def audit(specs: list[LaunchSpec] | None = None,
          progress: Callable[[str], None] | None = None) -> list[KernelReport]:
    """Compile and report every spec (default: ``launch_specs()``)."""
    out = []
    for spec in specs if specs is not None else launch_specs():
        if progress:
            progress(spec.name)
        out.append(_report(spec))
    return out


def format_table(reports: list[KernelReport]) -> str:
    rows = ["| kernel | config | regs | spills | smem KiB | HGMMA | HMMA | async copies | fits | "
            "problems |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in reports:
        rows.append(f"| {r.name} | {r.config} | {r.regs} | {r.spill_ops} | {r.smem / 1024:.0f} | "
                    f"{r.wgmma} | {r.mma} | {r.async_copies} | {'yes' if r.fits else 'skipped'} | "
                    f"{'; '.join(r.problems) or '—'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Compile every kernel config for sm_90a and report "
                                            "registers, spills, shared memory and MMA kind.")
    p.add_argument("--dtypes", default="bf16", help="comma-separated: bf16,fp16,fp32")
    p.add_argument("--rank", type=int, default=64)
    a = p.parse_args(argv)
    specs = launch_specs(tuple(d.strip() for d in a.dtypes.split(",")), a.rank)
    reports = audit(specs, progress=lambda n: print(f"compiling {n}", file=sys.stderr, flush=True))
    print(f"triton {triton.__version__}, target sm_90a\n")
    print(format_table(reports))
    bad = [r for r in reports if r.problems]
    families = {r.name for r in reports}
    empty = sorted(f for f in families if not any(r.fits and not r.problems for r in reports if r.name == f))
    print(f"\n{len(reports)} configs, {len(bad)} with problems, "
          f"{sum(not r.fits for r in reports)} skipped for shared memory; "
          f"kernels with no usable config: {', '.join(empty) or 'none'}")
    return 1 if bad or empty else 0


if __name__ == "__main__":
    sys.exit(main())
