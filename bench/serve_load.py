"""Load test of `rain serve` on loopback with a tiny model: mixed vs single λ, then kill -9 under load.

    python bench/serve_load.py [--clients 8] [--seconds 10] [--max-tokens 16] [--burst 200]
                               [--phases sustained,burst,kill9] [--batching dynamic] [--out results.json]
    python bench/serve_load.py --phases processors,loglikelihood --concurrency 1,8,32 --max-batch-size 32

1. builds a tiny Qwen2 + random adapter in a temp dir and starts `rain serve` as a subprocess on
   127.0.0.1 (free port; readiness by polling /health);
2. N client threads send greedy chat requests for a bounded time: first with λ drawn from
   {0, 0.5, 1, 1.5, 2} per request (mixed), then all with λ = 1 (single); reports failures,
   throughput (req/s, generated tok/s), latency p50/p99 and the mean rows per generate call;
2b. burst (issue 13): ``--burst`` requests (200) sent at once from one asyncio httpx client, each with
   λ drawn from {0, 0.5, 1, 1.5, 2}; all must succeed (0 failures) and be logged ``ok``; reports
   p50 / p99 / max latency, throughput and the mean rows per forward batch;
2c. processors (issue 22): at each ``--concurrency`` (1, 8, 32), plain greedy requests vs a mix where half
   carry ``ignore_eos`` + ``top_k`` + ``presence_penalty`` + ``logit_bias``; generated tok/s of both and
   their ratio (goal: mixed ≥ 0.8 × plain at 32), all requests carrying them, and the mean rows per
   generate call;
2d. loglikelihood: lm-eval's ``local-completions`` loglikelihood requests (echo + logprobs) with
   ``num_concurrent`` 1 and 4; the mean rows per generate call shows whether they ran batched;
3. starts the load again (max_tokens 4, so many requests complete), kill -9's the server mid-load, restarts it on the same SQLite log and
   checks that every request that got a 200 response before the kill is in the log.
Only loopback; client count and duration are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from rain_adapter.testing.server import free_port, wait_healthy
from rain_adapter.testing.serve_tiny import build_tiny_serving

HOST = "127.0.0.1"
PROMPTS = ["What is 2+2?", "Write a haiku about rain.", "List three colours.", "Explain gravity briefly.",
           "Translate 'hello' to French.", "Why is the sky blue? Answer in one sentence."]


def start_server(model_dir: Path, adapter_dir: Path, db: Path, port: int, max_tokens: int,
                 batching: str = "dynamic", max_batch_size: int = 8) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rain_adapter.cli.serve", "serve", "--model", str(model_dir), "--adapter",
           str(adapter_dir), "--host", HOST, "--port", str(port), "--db", str(db), "--max-batch-size",
           str(max_batch_size),
           "--batch-window-ms", "10", "--max-tokens-cap", str(max_tokens), "--log-level", "warning",
           "--device", "cpu", "--dtype", "float32", "--batching", batching]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_healthy(f"http://{HOST}:{port}", timeout=120, proc=proc)
    return proc


#: the processor fields of the ``processors`` phase (issue 22): what a request that used to run alone carries
PROCESSOR_FIELDS = {"ignore_eos": True, "top_k": 20, "presence_penalty": 0.5, "logit_bias": {"65": 2.0}}


def run_load(port: int, clients: int, seconds: float, max_tokens: int, lambdas: list[float],
             stop: threading.Event | None = None, seed: int = 0, processor_share: float = 0.0) -> dict:
    url = f"http://{HOST}:{port}/v1/chat/completions"
    stop = stop or threading.Event()
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    lat, toks, acked, failures = [], [], [], []

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(timeout=120) as c:
            while time.monotonic() < deadline and not stop.is_set():
                body = {"model": "adapter", "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                        "max_tokens": max_tokens, "temperature": 0, "rain_lambda": rng.choice(lambdas),
                        "user": f"u{i}"}
                if processor_share and rng.random() < processor_share:
                    body.update(PROCESSOR_FIELDS)
                t0 = time.perf_counter()
                try:
                    r = c.post(url, json=body)
                    dt = time.perf_counter() - t0
                    if r.status_code == 200:
                        j = r.json()
                        with lock:
                            lat.append(dt)
                            toks.append(j["usage"]["completion_tokens"])
                            acked.append(j["id"])
                    else:
                        with lock:
                            failures.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    with lock:
                        failures.append(f"{type(e).__name__}: {e}")
                    if stop.is_set() or stop.wait(2.0):  # server gone (kill -9 phase): stop this client
                        return

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.asarray(lat) if lat else np.asarray([np.nan])
    return {"clients": clients, "seconds": round(wall, 2), "ok": len(lat), "failed": len(failures),
            "failures_sample": failures[:3], "req_per_s": round(len(lat) / wall, 2),
            "gen_tok_per_s": round(sum(toks) / wall, 1), "p50_s": round(float(np.percentile(a, 50)), 3),
            "p99_s": round(float(np.percentile(a, 99)), 3), "acked": acked}


def run_burst(port: int, n: int, max_tokens: int, lambdas: list[float], seed: int = 11) -> dict:
    """``n`` concurrent chat requests at once (mixed λ), one asyncio client; latency per request."""
    url = f"http://{HOST}:{port}/v1/chat/completions"
    rng = random.Random(seed)
    bodies = [{"model": "adapter", "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
               "max_tokens": max_tokens, "temperature": 0, "rain_lambda": rng.choice(lambdas), "user": f"b{i}"}
              for i in range(n)]

    async def go() -> tuple[list, float]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(timeout=600, limits=limits) as c:
            async def one(body: dict) -> tuple[float | None, object]:
                t0 = time.perf_counter()
                try:
                    r = await c.post(url, json=body)
                except httpx.HTTPError as e:
                    return None, f"{type(e).__name__}: {e}"
                dt = time.perf_counter() - t0
                return (dt, r.json()) if r.status_code == 200 else (None, f"{r.status_code}: {r.text[:200]}")

            t0 = time.perf_counter()
            res = await asyncio.gather(*(one(b) for b in bodies))
            return res, time.perf_counter() - t0

    res, wall = asyncio.run(go())
    ok = [(dt, j) for dt, j in res if dt is not None]
    failures = [j for dt, j in res if dt is None]
    a = np.asarray([dt for dt, _ in ok]) if ok else np.asarray([np.nan])
    return {"requests": n, "lambdas": sorted({b["rain_lambda"] for b in bodies}), "ok": len(ok),
            "failed": len(failures), "failures_sample": failures[:3], "seconds": round(wall, 2),
            "req_per_s": round(len(ok) / wall, 2),
            "gen_tok_per_s": round(sum(j["usage"]["completion_tokens"] for _, j in ok) / wall, 1),
            "p50_s": round(float(np.percentile(a, 50)), 3), "p99_s": round(float(np.percentile(a, 99)), 3),
            "max_s": round(float(np.max(a)), 3), "acked": [j["id"] for _, j in ok]}


def run_processors(port: int, db: Path, concurrencies: list[int], seconds: float, max_tokens: int,
                   rounds: int = 3) -> dict:
    """Plain requests vs a mix where half carry :data:`PROCESSOR_FIELDS` (and vs all carrying them), at each
    concurrency; the ratio of generated tokens per second (issue 22's goal: mixed ≥ 0.8 × plain at
    concurrency 32). The arms alternate for ``rounds`` rounds of ``seconds`` each (plain, mixed, all,
    plain, ...) and each arm's median round is reported, so a slow spell of a shared machine hits every
    arm alike. ``ignore_eos`` rows run to ``max_tokens`` while plain rows may stop at EOS, so req/s and
    the rows per generate call are reported next to tok/s."""
    arms = (("plain", 0.0), ("mixed", 0.5), ("all_processors", 1.0))
    out = {}
    for c in concurrencies:
        runs: dict[str, list[dict]] = {name: [] for name, _ in arms}
        for k in range(rounds):
            for name, share in arms:
                r = run_load(port, c, seconds, max_tokens, [0.0, 1.0, 2.0], seed=100 * c + k, processor_share=share)
                r["mean_rows_per_generate"] = mean_batch(db, r["acked"])
                runs[name].append(r)
        row = {}
        for name, _ in arms:
            rs = runs[name]
            med = sorted(rs, key=lambda r: r["gen_tok_per_s"])[len(rs) // 2]
            row[name] = {k: med[k] for k in ("gen_tok_per_s", "req_per_s", "p50_s", "mean_rows_per_generate")}
            row[name]["rounds_tok_per_s"] = [r["gen_tok_per_s"] for r in rs]
            row[name]["ok"] = sum(r["ok"] for r in rs)
            row[name]["failed"] = sum(r["failed"] for r in rs)
            fails = [f for r in rs for f in r["failures_sample"]]
            if fails:
                row[name]["failures_sample"] = fails[:3]
        for name in ("mixed", "all_processors"):
            row[f"{name}_over_plain"] = round(row[name]["gen_tok_per_s"] / max(row["plain"]["gen_tok_per_s"], 1e-9), 3)
        out[f"c{c}"] = row
        print(f"processors c={c}", json.dumps(row), flush=True)
    return out


def run_loglikelihood(port: int, db: Path, model_dir: Path, n: int, concurrent: int) -> dict:
    """lm-eval's ``local-completions`` loglikelihood (echo + logprobs + max_tokens 1) with ``num_concurrent``;
    the mean rows per generate call of those requests (> 1: they ran batched) and the wall time."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    con = sqlite3.connect(db)
    before = {r[0] for r in con.execute("SELECT id FROM requests")}
    con.close()
    lm = LocalCompletionsAPI(model="adapter", base_url=f"http://{HOST}:{port}/v1/completions",
                             tokenizer=str(model_dir), tokenized_requests=False, max_retries=1,
                             num_concurrent=concurrent)
    reqs = [Instance("loglikelihood", {}, (PROMPTS[i % len(PROMPTS)], f" answer {i}"), i) for i in range(n)]
    t0 = time.perf_counter()
    res = lm.loglikelihood(reqs, disable_tqdm=True)
    wall = time.perf_counter() - t0
    con = sqlite3.connect(db)
    ids = [r[0] for r in con.execute("SELECT id FROM requests") if r[0] not in before]
    con.close()
    return {"requests": n, "num_concurrent": concurrent, "answers": len(res), "seconds": round(wall, 2),
            "mean_rows_per_generate": mean_batch(db, ids),
            "all_finite": all(np.isfinite(lp) for lp, _ in res)}


def logged_ok(db: Path, ids: list[str]) -> int:
    con = sqlite3.connect(db)
    try:
        q = ",".join("?" * len(ids))
        return con.execute(f"SELECT COUNT(*) FROM requests WHERE status='ok' AND id IN ({q})", ids).fetchone()[0] \
            if ids else 0
    finally:
        con.close()


def mean_batch(db: Path, ids: list[str]) -> float | None:
    con = sqlite3.connect(db)
    try:
        q = ",".join("?" * len(ids))
        v = con.execute(f"SELECT AVG(batch_size) FROM requests WHERE id IN ({q})", ids).fetchone()[0] if ids else None
    finally:
        con.close()
    return round(v, 2) if v is not None else None


def run_kill9(proc: subprocess.Popen, start, db: Path, port: int, clients: int, seconds: float,
              kill_after: float) -> tuple[subprocess.Popen, dict]:
    """Load (max_tokens 4), ``kill -9`` the server after ``kill_after`` s, restart it on the same log, and
    count the requests acknowledged (HTTP 200 received) before the kill that are missing from the log."""
    stop = threading.Event()
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(
        run_load(port, clients, seconds + kill_after + 30, 4, [0.0, 1.0, 2.0], stop, seed=7)))
    th.start()
    time.sleep(kill_after)  # let load build up (a duration, not synchronisation)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stop.set()
    th.join()
    acked = box["acked"]
    proc = start()
    con = sqlite3.connect(db)
    logged = {r[0] for r in con.execute("SELECT id FROM requests")}
    con.close()
    missing = [a for a in acked if a not in logged]
    ok_after = httpx.post(f"http://{HOST}:{port}/v1/chat/completions", timeout=60, json={
        "model": "adapter", "messages": [{"role": "user", "content": "back?"}], "max_tokens": 4,
        "temperature": 0}).status_code
    return proc, {"acked_before_kill": len(acked), "missing_from_log": len(missing),
                  "failed_in_flight_at_kill": box["failed"], "restart_status": ok_after}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kill-after", type=float, default=10.0, help="seconds of load before kill -9")
    ap.add_argument("--burst", type=int, default=200, help="requests sent at once in the burst phase")
    ap.add_argument("--phases", default="sustained,burst,kill9",
                    help="comma-separated: sustained (mixed vs single λ), burst, kill9, processors (plain vs "
                         "half carrying logits processors, at --concurrency), loglikelihood (lm-eval, "
                         "num_concurrent=4)")
    ap.add_argument("--concurrency", default="1,8,32", help="client counts of the processors phase")
    ap.add_argument("--max-batch-size", type=int, default=8, help="rain serve --max-batch-size")
    ap.add_argument("--loglikelihood-requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per arm in the processors phase")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--batching", choices=["dynamic", "continuous"], default="dynamic",
                    help="the server's batching mode (rain serve --batching)")
    args = ap.parse_args(argv)
    clients = max(1, min(args.clients, 64))
    seconds = max(1.0, min(args.seconds, 120.0))
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    burst = max(1, min(args.burst, 1000))

    results: dict = {"clients": clients, "seconds": seconds, "max_tokens": args.max_tokens,
                     "batching": args.batching}
    with tempfile.TemporaryDirectory(prefix="rain_serve_load_") as tmp:
        tmp = Path(tmp)
        model_dir, adapter_dir = build_tiny_serving(tmp)
        db = tmp / "log.sqlite"
        port = free_port()
        proc = start_server(model_dir, adapter_dir, db, port, args.max_tokens, args.batching, args.max_batch_size)
        try:
            run_load(port, 2, 2.0, args.max_tokens, [1.0])  # warm-up
            for name, lams in (("mixed_lambda", [0.0, 0.5, 1.0, 1.5, 2.0]), ("single_lambda", [1.0])):
                if "sustained" not in phases:
                    break
                r = run_load(port, clients, seconds, args.max_tokens, lams)
                r["mean_rows_per_generate"] = mean_batch(db, r["acked"])
                results[name] = {k: v for k, v in r.items() if k != "acked"}
                print(name, json.dumps(results[name]), flush=True)
            if "processors" in phases:
                conc = [max(1, min(int(c), 64)) for c in args.concurrency.split(",") if c.strip()]
                results["processors"] = run_processors(port, db, conc, seconds, args.max_tokens, args.rounds)
            if "loglikelihood" in phases:
                results["loglikelihood"] = {f"num_concurrent_{c}": run_loglikelihood(
                    port, db, model_dir, args.loglikelihood_requests, c) for c in (1, 4)}
                print("loglikelihood", json.dumps(results["loglikelihood"]), flush=True)
            if "burst" in phases:
                r = run_burst(port, burst, args.max_tokens, [0.0, 0.5, 1.0, 1.5, 2.0])
                r["logged_ok"] = logged_ok(db, r["acked"])
                r["mean_rows_per_generate"] = mean_batch(db, r["acked"])
                results["burst"] = {k: v for k, v in r.items() if k != "acked"}
                print("burst", json.dumps(results["burst"]), flush=True)
            if "kill9" in phases:
                proc, results["kill9"] = run_kill9(proc, lambda: start_server(
                    model_dir, adapter_dir, db, port, args.max_tokens, args.batching, args.max_batch_size), db, port,
                    clients, seconds,
                    args.kill_after)
                print("kill9", json.dumps(results["kill9"]), flush=True)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    ok = (all(results[k]["failed"] == 0 for k in ("mixed_lambda", "single_lambda") if k in results)
          and ("burst" not in results or (results["burst"]["failed"] == 0
                                          and results["burst"]["logged_ok"] == results["burst"]["requests"]))
          and ("kill9" not in results or results["kill9"]["missing_from_log"] == 0)
          and all(r[k]["failed"] == 0 for r in results.get("processors", {}).values()
                  for k in ("plain", "mixed", "all_processors"))
          and all(r["all_finite"] and r["answers"] == r["requests"]
                  for r in results.get("loglikelihood", {}).values()))
    print("PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
