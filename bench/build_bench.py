"""Benchmark `rain build` (Stage 1, --no-stage2) on a ~100M-parameter random Qwen2 triple on CPU.

    python bench/build_bench.py [--samples 16] [--sequential] [--projection hard] [--protect-energy 0.99]
                          [--layers 13] [--threads 2] [--triple-dir DIR]

Generates the triple (sharded safetensors, offline byte-level tokenizer; hidden 768, 12 heads,
4 kv heads, intermediate 2560, ``--layers`` decoder layers: 13 → 97.6M parameters, 372 MiB float32)
in a temp dir (or reuses ``--triple-dir`` when it already holds one of that size), then runs the
build in a child process and reports:

* ``build_s``: wall time of ``build_adapter``; ``phases_s``: time per phase (LRM load, feature
  forwards, task-vector streaming, projection (of which SVD), partial-cache writes, final write);
* ``peak_rss_mib`` (ru_maxrss) and, from a 20 ms sampler of /proc/self/status, the peak of the
  anonymous part (``peak_anon_mib``: heap/tensors, what the build really allocates) and the RSS
  split at that moment; the rest of the RSS is file-backed pages of memory-mapped safetensors (the
  LRM's weights and the partial cache), which are reclaimable page cache;
* ``peak_rss_by_phase_mib``: the largest RSS seen inside each phase (rss, anon).

Calibration: the shared reasoning set (first --samples usable; ~3,000 byte-level tokens each).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CFG = dict(hidden_size=768, intermediate_size=2560, num_hidden_layers=13, num_attention_heads=12,
           num_key_value_heads=4)


def _status_mib() -> tuple[float, float]:
    """(VmRSS, RssAnon) of this process in MiB (cheap: /proc/self/status, Linux only)."""
    rss = anon = 0.0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss, anon


class _Meter:
    """Phase timer + RSS sampler thread (rss and anonymous peaks, overall and per active phase)."""

    def __init__(self, period: float = 0.02):
        self.lock = threading.Lock()
        self.stack: list[str] = []
        self.times: dict[str, list] = {}
        self.peak = {"rss": 0.0, "anon": 0.0, "rss_at_peak_anon": 0.0}
        self.by_phase: dict[str, tuple[float, float]] = {}
        self.period = period
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            rss, anon = _status_mib()
            with self.lock:
                self.peak["rss"] = max(self.peak["rss"], rss)
                if anon > self.peak["anon"]:
                    self.peak["anon"], self.peak["rss_at_peak_anon"] = anon, rss
                for p in set(self.stack) or {"other"}:
                    r, a = self.by_phase.get(p, (0.0, 0.0))
                    self.by_phase[p] = (max(r, rss), max(a, anon))
            time.sleep(self.period)

    def _enter(self, label):
        with self.lock:
            self.stack.append(label)
        return time.perf_counter()

    def _exit(self, label, t0):
        dt = time.perf_counter() - t0
        with self.lock:
            self.stack.remove(label)
            n_s = self.times.setdefault(label, [0, 0.0])
            n_s[0] += 1
            n_s[1] += dt

    def wrap(self, owner, name: str, label: str) -> None:
        f = getattr(owner, name)

        @functools.wraps(f)
        def g(*a, **k):
            t0 = self._enter(label)
            try:
                return f(*a, **k)
            finally:
                self._exit(label, t0)
        setattr(owner, name, g)

    def wrap_iter(self, owner, name: str, label: str) -> None:
        """Time a generator's own work (between yields), not the consumer's."""
        f = getattr(owner, name)

        @functools.wraps(f)
        def g(*a, **k):
            it = iter(f(*a, **k))
            while True:
                t0 = self._enter(label)
                try:
                    x = next(it)
                except StopIteration:
                    return
                finally:
                    self._exit(label, t0)
                yield x
        setattr(owner, name, g)


def child(args) -> None:
    meter = _Meter()
    import transformers

    import rain_adapter.merging.cache as C
    import rain_adapter.merging.pipeline as B
    import rain_adapter.merging.features as F
    import rain_adapter.merging.nullspace as NS
    import rain_adapter.format.store as ST
    import rain_adapter.merging.taskvector as TV

    # phases (module attributes looked up at call time by build.py / features.py)
    meter.wrap(transformers.AutoModelForCausalLM, "from_pretrained", "load_lrm")
    meter.wrap(B, "prepare_reasoning_calibration", "calibration")
    meter.wrap_iter(F, "iter_layer_features", "features (LRM forwards)")
    meter.wrap(TV, "task_vector", "task_vector (stream ITM-base)")
    meter.wrap(B, "project", "projection")
    meter.wrap(NS, "feature_basis", "projection: svd")
    meter.wrap(C, "save_layer", "partial cache write")
    meter.wrap(C, "load_layer", "partial cache read")
    meter.wrap(ST, "save_adapter", "final write")
    base_rss, base_anon = _status_mib()

    t0 = time.perf_counter()
    B.build_adapter(args.lrm, args.itm, args.base, args.out, reasoning_calib=args.calib, max_samples=args.samples,
                    min_samples=1, max_seq_len=100_000, projection=args.projection,
                    protect_energy=args.protect_energy, sequential=args.sequential, no_stage2=True,
                    progress=False, verbose=False, method=args.method)
    wall = time.perf_counter() - t0
    time.sleep(2 * meter.period)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    cfg = json.loads((Path(args.out) / "adapter_config.json").read_text())
    kept = [s["kept_norm"] for s in cfg["stage1"]["modules"].values()]
    res = [s.get("residual", float("nan")) for s in cfg["stage1"]["modules"].values()]
    adapter_mib = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors")) / 2**20
    with meter.lock:
        print(json.dumps({
            "build_s": round(wall, 2), "peak_rss_mib": round(rss, 1),
            "peak_anon_mib": round(meter.peak["anon"], 1),
            "rss_at_peak_anon_mib": round(meter.peak["rss_at_peak_anon"], 1),
            "rss_before_build_mib": round(base_rss, 1), "anon_before_build_mib": round(base_anon, 1),
            "adapter_mib": round(adapter_mib, 1),
            "phases_s": {k: round(v[1], 2) for k, v in meter.times.items()},
            "peak_rss_by_phase_mib": {k: [round(r), round(a)] for k, (r, a) in meter.by_phase.items()},
            "n_positions": cfg["stage1"].get("n_positions"),
            "mean_kept_norm": round(sum(kept) / len(kept), 4), "max_residual": max(res)}))


def _triple(root: Path, layers: int):
    """The bench triple under ``root`` (generated unless a complete one of this size is there)."""
    from rain_adapter.testing.fixtures import TriplePaths, make_tiny_triple

    p = TriplePaths(base=root / "base", itm=root / "itm", lrm=root / "lrm")
    try:
        ok = all(json.loads((d / "config.json").read_text())["num_hidden_layers"] == layers
                 and (d / "tokenizer.json").is_file() for d in (p.base, p.itm, p.lrm))
    except (OSError, KeyError, ValueError):
        ok = False
    if ok:
        return p, False
    return make_tiny_triple(root, arch="qwen2", seed=0, max_shard_size="50MB",
                            **dict(CFG, num_hidden_layers=layers)), True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--layers", type=int, default=CFG["num_hidden_layers"], help="decoder layers (13 → 97.6M params)")
    ap.add_argument("--projection", default="hard")
    ap.add_argument("--protect-energy", type=float, default=0.99)
    ap.add_argument("--method", default="rain")
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--triple-dir", default=None, help="keep / reuse the generated triple here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for k in ("lrm", "itm", "base", "out", "calib"):
        ap.add_argument(f"--{k}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    from rain_adapter.merging.calibration import default_reasoning_calib

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        p, generated = _triple(Path(args.triple_dir) if args.triple_dir else Path(d) / "triple", args.layers)
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
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"bench child failed (exit {out.returncode})")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update({"params_M": round(n_params / 1e6, 1), "lrm_checkpoint_mib": round(size / 2**20, 1),
                  "layers": args.layers, "triple_gen_s": round(gen_s, 1) if generated else "reused",
                  "samples": args.samples, "sequential": args.sequential, "projection": args.projection,
                  "protect_energy": args.protect_energy, "method": args.method, "threads": args.threads})
        print(json.dumps(r))


if __name__ == "__main__":
    main()
