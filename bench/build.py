"""Benchmark `rain build` (Stage 1, --no-stage2) on a ~100M-parameter random Qwen2 triple on CPU.

    python bench/build.py [--samples 16] [--sequential] [--projection hard] [--protect-energy 0.99]

Generates the triple (sharded safetensors, offline byte-level tokenizer) in a temp dir, then runs
the build in a child process and reports wall time and the child's peak RSS (ru_maxrss), plus the
LRM checkpoint size for scale. Calibration: the shared reasoning set (first --samples usable).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CFG = dict(hidden_size=768, intermediate_size=2560, num_hidden_layers=13, num_attention_heads=12,
           num_key_value_heads=4)


def child(args) -> None:
    from rain_adapter.build import build_adapter

    t0 = time.perf_counter()
    build_adapter(args.lrm, args.itm, args.base, args.out, reasoning_calib=args.calib, max_samples=args.samples,
                  min_samples=1, max_seq_len=100_000, projection=args.projection, protect_energy=args.protect_energy,
                  sequential=args.sequential, no_stage2=True, progress=False, verbose=False, method=args.method)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    cfg = json.loads((Path(args.out) / "adapter_config.json").read_text())
    kept = [s["kept_norm"] for s in cfg["stage1"]["modules"].values()]
    res = [s.get("residual", float("nan")) for s in cfg["stage1"]["modules"].values()]
    print(json.dumps({"build_s": round(wall, 2), "peak_rss_mib": round(rss, 1),
                      "n_positions": cfg["stage1"].get("n_positions"),
                      "mean_kept_norm": round(sum(kept) / len(kept), 4), "max_residual": max(res)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--projection", default="hard")
    ap.add_argument("--protect-energy", type=float, default=0.99)
    ap.add_argument("--method", default="rain")
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for k in ("lrm", "itm", "base", "out", "calib"):
        ap.add_argument(f"--{k}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    from rain_adapter.calibration import default_reasoning_calib
    from rain_adapter.fixtures import make_tiny_triple

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        p = make_tiny_triple(Path(d) / "triple", arch="qwen2", seed=0, max_shard_size="50MB", **CFG)
        gen_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in p.lrm.glob("*.safetensors"))
        from safetensors import safe_open
        n_params = 0
        for f in p.lrm.glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                n_params += sum(int(torch.tensor(h.get_slice(k).get_shape()).prod()) for k in h.keys())
        cmd = [sys.executable, __file__, "--child", "--lrm", str(p.lrm), "--itm", str(p.itm), "--base", str(p.base),
               "--out", str(Path(d) / "adapter"), "--calib", str(default_reasoning_calib()),
               "--samples", str(args.samples), "--projection", args.projection,
               "--protect-energy", str(args.protect_energy), "--method", args.method, "--threads", str(args.threads)]
        if args.sequential:
            cmd.append("--sequential")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update({"params_M": round(n_params / 1e6, 1), "lrm_checkpoint_mib": round(size / 2**20, 1),
                  "triple_gen_s": round(gen_s, 1), "samples": args.samples, "sequential": args.sequential,
                  "projection": args.projection, "protect_energy": args.protect_energy, "method": args.method,
                  "threads": args.threads})
        print(json.dumps(r))


if __name__ == "__main__":
    main()
