"""Check ``rain plan``'s cost model against measured builds on this machine (issue 14).

    python bench/plan_check.py [--threads 2] [--samples 4] [--triple-dir /tmp/plan_triple] [--skip-seq]

1. Calibrates a ``cpu`` profile ONCE from micro-benchmarks (no build): float32 / bfloat16 matmul
   throughput, memory bandwidth (tensor clone), disk write (256 MiB + fsync), sha256 rate, one small
   projection call's latency, and the process baseline (anonymous memory after the imports).
2. Runs real builds through bench/build.py (Stage 1, --no-stage2, dense, float32): the tiny triple
   (hidden 64, 2 layers), the ~100M random Qwen2 triple (one pass, and --sequential).
3. Predicts each with ``rain_adapter.build.plan`` (exact token counts from the triple's tokenizer)
   and prints predicted vs measured: wall time, peak anonymous memory, peak RSS, adapter size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _bench(fn, seconds: float = 1.5, trials: int = 5) -> float:
    """Calls per second of ``fn``: the best of ``trials`` short runs (after a warm-up call), so a
    moment of contention from other jobs on a shared machine does not become the profile."""
    fn()
    best = 0.0
    for _ in range(trials):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / trials or n == 0:
            fn()
            n += 1
        best = max(best, n / (time.perf_counter() - t0))
    return best


def _baseline_gib() -> tuple[float, float]:
    """(anonymous, file-backed) RSS of a fresh process after importing what a build imports."""
    code = ("import transformers, rain_adapter.build.pipeline\n"
            "print(*[l.split()[1] for l in open('/proc/self/status') if l.startswith(('RssAnon', 'RssFile'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    anon, files = out.stdout.split()[-2:]
    return int(anon) / 2**20, int(files) / 2**20


def calibrate(threads: int):
    """The ``cpu`` profile of this machine from micro-benchmarks."""
    import torch

    from rain_adapter.build.nullspace import project
    from rain_adapter.build.plan import PROFILES

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 768), torch.randn(768, 2560)
    f32 = _bench(lambda: a @ b) * 2 * 2048 * 768 * 2560 / 1e12
    a16, b16 = a.bfloat16(), b.bfloat16()
    bf16 = _bench(lambda: a16 @ b16) * 2 * 2048 * 768 * 2560 / 1e12
    x = torch.randn(32 * 2**20)
    mem = _bench(lambda: x.clone()) * 2 * x.numel() * 4 / 1e9
    blob = os.urandom(64 * 2**20)
    sha = _bench(lambda: hashlib.sha256(blob).digest()) * len(blob) / 1e9
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with open(Path(d) / "f", "wb") as f:
            for _ in range(4):
                f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        disk = 4 * len(blob) / (time.perf_counter() - t0) / 1e9
    D, X = torch.randn(256, 256), torch.randn(48, 256)
    base, libs = _baseline_gib()
    latency = 1.0 / _bench(lambda: project(D, X, protect_energy=0.99), 1.0)
    prof = replace(PROFILES["cpu"], name="cpu (measured here)", tflops=bf16, fp32_tflops=f32, mem_gbps=mem,
                   disk_gbps=disk, link_gbps=mem, cores=threads, hash_gbps=sha, module_latency_s=latency,
                   base_gib=base, lib_gib=libs, note="bench/plan_check.py micro-benchmarks")
    return prof


def measured(triple_dir: Path, layers: int, samples: int, threads: int, sequential: bool) -> dict:
    cmd = [sys.executable, str(HERE / "build.py"), "--samples", str(samples), "--layers", str(layers),
           "--threads", str(threads), "--triple-dir", str(triple_dir)] + (["--sequential"] if sequential else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if out.returncode:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"build failed: {cmd}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def predicted(lrm: Path, samples: int, sequential: bool, prof) -> dict:
    from transformers import AutoTokenizer

    from rain_adapter.build.calibration import prepare_reasoning_calibration
    from rain_adapter.build.plan import CalibShape, ModelShape, PlanOptions, make_plan

    m = ModelShape.from_config(json.loads((lrm / "config.json").read_text()), str(lrm))
    c = prepare_reasoning_calibration(AutoTokenizer.from_pretrained(str(lrm)), max_samples=samples,
                                      max_seq_len=100_000, min_samples=1)
    cal = CalibShape(tuple(len(i.input_ids) for i in c.items), c.n_positions, "tokenized", True)
    plan = make_plan(m, cal, PlanOptions(dtype="float32", sequential=sequential, stage2=False), prof)
    return {"s": plan.seconds, "anon": plan.peak("host_anon") / 2**20, "rss": plan.peak("host_rss") / 2**20,
            "adapter": plan.adapter_bytes / 2**20, "tokens": cal.tokens, "params_M": m.params / 1e6,
            "stages": {s.name: round(s.seconds, 2) for s in plan.stages}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--triple-dir", default="/tmp/plan_triple")
    ap.add_argument("--tiny-dir", default="/tmp/plan_tiny")
    ap.add_argument("--skip-seq", action="store_true")
    args = ap.parse_args()
    prof = calibrate(args.threads)
    print(json.dumps({"profile": {k: round(v, 4) if isinstance(v, float) else v for k, v in vars(prof).items()}}))
    from rain_adapter.testing.fixtures import make_tiny_triple

    tiny = Path(args.tiny_dir)
    if not (tiny / "lrm" / "tokenizer.json").is_file():
        make_tiny_triple(tiny, arch="qwen2", seed=0)
    runs = [("tiny (hidden 64, 2 layers)", tiny, 2, 16, False),
            ("~100M Qwen2, one pass", Path(args.triple_dir), 13, args.samples, False)]
    if not args.skip_seq:
        runs.append(("~100M Qwen2, --sequential", Path(args.triple_dir), 13, args.samples, True))
    rows = []
    for label, d, layers, n, seq in runs:
        meas = measured(d, layers, n, args.threads, seq)
        pred = predicted(d / "lrm", n, seq, prof)
        rows.append({"run": label, "samples": n, "pred": pred, "meas": meas})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| run | tokens | time s pred / meas | peak anon MiB pred / meas | peak RSS MiB pred / meas | adapter MiB pred / meas |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        p, m = r["pred"], r["meas"]

        def cell(a, b):
            return f"{a:,.1f} / {b:,.1f} ({100 * (a - b) / b:+.0f}%)"
        print(f"| {r['run']}, {r['samples']} samples | {p['tokens']:,} | {cell(p['s'], m['build_s'])} | "
              f"{cell(p['anon'], m['peak_anon_mib'])} | {cell(p['rss'], m['peak_rss_mib'])} | "
              f"{cell(p['adapter'], m['adapter_mib'])} |")


if __name__ == "__main__":
    main()
