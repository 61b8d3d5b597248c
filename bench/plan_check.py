"""Check ``rain plan``'s cost model against measured builds on this machine (issue 14).

    python bench/plan_check.py [--threads 2] [--samples 4] [--triple-dir /tmp/plan_triple] [--skip-seq]

1. Calibrates a ``cpu`` profile ONCE from micro-benchmarks, each the median of 3: float32 / bfloat16
   matmul throughput, memory bandwidth (tensor clone), disk write (256 MiB + fsync), sha256 rate,
   the per-module fixed cost (small safetensors write + read + one small ``project`` call), and,
   in fresh processes, a micro build (hidden 32, 1 layer, 1 sample: ~no compute) whose wall time is
   the start-up cost and whose end state is the process baseline (anonymous + file-backed RSS), then
   the latency of a hooked 8-token forward of 1- and 5-layer micro models (per forward, per layer).
2. Runs real builds through bench/build_bench.py (Stage 1, --no-stage2, dense, float32): the tiny triple
   (hidden 64, 2 layers), the ~100M random Qwen2 triple (one pass, and --sequential).
3. Predicts each with ``rain_adapter.merging.plan`` (exact token counts from the triple's tokenizer)
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


def _bench(fn, seconds: float = 1.5, trials: int = 3) -> float:
    """Calls per second of ``fn``: the median of ``trials`` short runs (after a warm-up call); the
    median, not the best, so that the profile is this machine's typical rate, not its luckiest."""
    fn()
    rates = []
    for _ in range(trials):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / trials or n == 0:
            fn()
            n += 1
        rates.append(n / (time.perf_counter() - t0))
    return sorted(rates)[len(rates) // 2]


#: run in a fresh process: a micro build (hidden 32, 1 layer, 1 sample: the fixed costs, ~no compute),
#: then the started process's memory, then forward latencies of hooked micro models (1 vs 5 layers).
STARTUP_CODE = r"""
import json, sys, tempfile, time
import torch
torch.set_num_threads(int(sys.argv[2]))
import transformers
import rain_adapter.merging.pipeline as B
from rain_adapter.merging.features import trim_heap
micro = sys.argv[1]
def status():
    d = {l.split(':')[0]: int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith(('RssAnon', 'RssFile'))}
    return d['RssAnon'], d['RssFile']
with tempfile.TemporaryDirectory() as out:
    t0 = time.perf_counter()
    B.build_adapter(micro + '/lrm', micro + '/itm', micro + '/base', out + '/a', max_samples=1, min_samples=1,
                    max_seq_len=100_000, projection='hard', no_stage2=True, progress=False, verbose=False)
    wall = time.perf_counter() - t0
anon, files = status()
def fwd(layers):
    cfg = transformers.AutoConfig.for_model('qwen2', hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                            num_attention_heads=2, num_key_value_heads=1, vocab_size=264)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    buf = torch.empty(8, 64)
    for l in m.model.layers:
        for lin in (l.self_attn.q_proj, l.self_attn.o_proj, l.mlp.gate_proj, l.mlp.down_proj):
            lin.register_forward_pre_hook(lambda mod, a: (buf[:1, :a[0].shape[-1]].copy_(a[0][0, :1]), None)[1])
    ids = torch.randint(0, 264, (1, 8)); mask = torch.ones_like(ids)
    res = []
    with torch.inference_mode():
        m.model(input_ids=ids, attention_mask=mask, use_cache=False)
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(40):
                m.model(input_ids=ids, attention_mask=mask, use_cache=False)
                trim_heap()
            res.append((time.perf_counter() - t) / 40)
    return sorted(res)[1]
t1, t5 = fwd(1), fwd(5)
print(json.dumps({"wall": wall, "anon_mib": anon, "file_mib": files, "t1": t1, "t5": t5}))
"""


def _startup(threads: int) -> dict:
    """Fixed costs from a fresh process (see STARTUP_CODE): the median of 3 processes per field."""
    from rain_adapter.testing.fixtures import make_tiny_triple

    runs = []
    with tempfile.TemporaryDirectory() as d:
        make_tiny_triple(d, arch="qwen2", seed=1, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
        for _ in range(3):
            out = subprocess.run([sys.executable, "-c", STARTUP_CODE, d, str(threads)], capture_output=True, text=True,
                                 check=True, env=dict(os.environ, TQDM_DISABLE="1"))
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: sorted(r[k] for r in runs)[1] for k in runs[0]}


def calibrate(threads: int):
    """The ``cpu`` profile of this machine from micro-benchmarks (each the median of 3)."""
    import torch
    from safetensors.torch import load_file, save_file

    from rain_adapter.merging.nullspace import project
    from rain_adapter.merging.plan import PROFILES

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 768), torch.randn(768, 2560)
    f32 = _bench(lambda: a @ b) * 2 * 2048 * 768 * 2560 / 1e12
    a16, b16 = a.bfloat16(), b.bfloat16()
    bf16 = _bench(lambda: a16 @ b16) * 2 * 2048 * 768 * 2560 / 1e12
    x = torch.randn(32 * 2**20)
    mem = _bench(lambda: x.clone()) * 2 * x.numel() * 4 / 1e9
    blob = os.urandom(64 * 2**20)
    sha = _bench(lambda: hashlib.sha256(blob).digest()) * len(blob) / 1e9
    disks = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(3):
            t0 = time.perf_counter()
            with open(Path(d) / "f", "wb") as f:
                for _ in range(4):
                    f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            disks.append(4 * len(blob) / (time.perf_counter() - t0) / 1e9)
        disk = sorted(disks)[1]
        D, X = torch.randn(256, 256), torch.randn(48, 256)
        path = str(Path(d) / "m.safetensors")

        def one_module():  # small Δ read + SVD / projection call + cache write: the per-call overheads
            save_file({"w": D}, path)
            project(load_file(path)["w"], X, protect_energy=0.99)
        latency = 1.0 / _bench(one_module, 1.5)
    st = _startup(threads)
    layer = max((st["t5"] - st["t1"]) / 4, 0.0)
    fwd = max(st["t1"] - layer, 0.0)
    startup = max(st["wall"] - 7 * latency - fwd - layer, 0.0)
    prof = replace(PROFILES["cpu"], name="cpu (measured here)", tflops=bf16, fp32_tflops=f32, mem_gbps=mem,
                   disk_gbps=disk, link_gbps=mem, cores=threads, hash_gbps=sha, module_latency_s=latency,
                   base_gib=st["anon_mib"] / 1024, lib_gib=st["file_mib"] / 1024, startup_s=startup,
                   forward_latency_s=fwd, layer_latency_s=layer, note="bench/plan_check.py micro-benchmarks")
    return prof


def measured(triple_dir: Path, layers: int, samples: int, threads: int, sequential: bool) -> dict:
    cmd = [sys.executable, str(HERE / "build_bench.py"), "--samples", str(samples), "--layers", str(layers),
           "--threads", str(threads), "--triple-dir", str(triple_dir)] + (["--sequential"] if sequential else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if out.returncode:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"build failed: {cmd}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def predicted(lrm: Path, samples: int, sequential: bool, prof) -> dict:
    from transformers import AutoTokenizer

    from rain_adapter.merging.calibration import prepare_reasoning_calibration
    from rain_adapter.merging.plan import CalibShape, ModelShape, PlanOptions, make_plan

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
