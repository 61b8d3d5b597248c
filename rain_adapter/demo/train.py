"""Train the toy world's trio (base, LRM, ITM) on the CPU and cache it as ordinary HF Qwen2 checkpoints.

base = a small Qwen2 pretrained (all tokens) on :func:`rain_adapter.demo.data.base_sample` documents;
LRM  = base + a short low-LR fine-tune on reasoning chats (loss on the assistant part only);
ITM  = base + a short low-LR fine-tune on instruction chats.
Both fine-tunes start from the same base weights, so Δ_I = W_ITM − W_base and the LRM's own
fine-tune are small refinements of one shared model (‖Δ‖/‖W‖ per module is recorded in world.json).

Cache: ``<adapter home>/world/<hash of WorldConfig>/{base,lrm,itm}`` plus the world's calibration
sets and evaluation prompt files; written atomically (temporary dir + ``os.replace``). A config with a
world shipped in the package (:mod:`rain_adapter.demo.shipped`) is copied from there, hash-checked,
instead of trained; ``force=True`` (``rain demo --retrain``) trains it from scratch.

Training is deterministic on one machine: seeds from the config, one torch thread
(:data:`TRAIN_THREADS`, whatever ``$RAIN_WORLD_THREADS`` says), deterministic algorithms; a test trains
the CI world twice and compares the weights. Across CPUs and library builds the last bits of float
reductions may differ, which is why the default world ships.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..demo import data as D
from . import shipped
from .tokenizer import make_world_tokenizer, train_backend

WORLD_VERSION = 5  # 5: deterministic training (one thread, deterministic algorithms), shipped world
TRAIN_THREADS = 1
Sampler = Callable[[random.Random], tuple[str, int]]


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines the trained world (its hash names the cache dir)."""

    n_digits: int = 3
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    seed: int = 0
    batch_size: int = 32
    base_steps: int = 1200
    base_lr: float = 3e-3
    ft_steps: int = 120
    ft_lr: float = 3e-4
    lrm_p_instr: float = 0.15  # share of LRM fine-tune prompts carrying a (then ignored) format instruction
    n_calib_reasoning: int = 64
    n_calib_instruction: int = 96
    n_eval: int = 120
    version: int = WORLD_VERSION
    #: share of the ITM's direct answers that are n-digit additions (the LRM's own task answered
    #: without thinking); the "format" world raises it so task arithmetic breaks the thinking format
    itm_direct_add: float = 0.25
    itm_ft_steps: int = 0  # ITM fine-tune steps; 0: ft_steps

    def key(self) -> str:
        d = asdict(self)
        # fields added after the shipped world leave its hash alone while at their defaults
        for name, default in _LATE_FIELDS.items():
            if d[name] == default:
                del d[name]
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


_LATE_FIELDS: dict[str, Any] = {"itm_direct_add": 0.25, "itm_ft_steps": 0}


def format_world_config(seed: int = 0) -> WorldConfig:
    """The "format" world: the ITM answers most additions directly and is tuned twice as long, so
    task arithmetic pushes the LRM to answer without its ``<think>`` block (the thinking format
    itself breaks, not only accuracy). Used by the Stage 2 trial (bench/stage2_trial.py)."""
    return WorldConfig(seed=seed, itm_direct_add=0.9, itm_ft_steps=240)


def ci_config() -> WorldConfig:
    """A smaller, faster world for the test suite (2-digit additions, fewer steps)."""
    return WorldConfig(n_digits=2, base_steps=800, base_lr=4e-3, ft_steps=80, n_calib_reasoning=32,
                       n_calib_instruction=48, n_eval=48)


@dataclass(frozen=True)
class WorldPaths:
    root: Path
    base: Path
    lrm: Path
    itm: Path
    reasoning_calib: Path       # JSON list of {prompt, reasoning, response}
    instruction_calib: Path     # JSONL in the shared instruction-calibration shape
    eval_reasoning: Path        # JSONL prompts: held-out additions + one instruction (LRM's task)
    eval_direct: Path           # JSONL prompts: easy questions + one instruction (ITM's task)
    info: Path                  # world.json: config, timings, losses, ‖Δ‖/‖W‖


def world_home() -> Path:
    """``$RAIN_WORLD_HOME``, else ``paths.cache_dir()/world`` (default ``~/.cache/rain_adapter/world``).

    Deliberately not under ``$RAIN_ADAPTER_HOME``: the trained world is an expensive cache, adapters
    are user data.
    """
    if os.environ.get("RAIN_WORLD_HOME"):
        return Path(os.environ["RAIN_WORLD_HOME"]).expanduser()
    from rain_adapter.format.paths import cache_dir

    return cache_dir() / "world"


def world_paths(root: Path) -> WorldPaths:
    return WorldPaths(root, root / "base", root / "lrm", root / "itm", root / "reasoning_calibration_set.json",
                      root / "instruction_calibration_set.jsonl", root / "eval_reasoning.jsonl",
                      root / "eval_direct.jsonl", root / "world.json")


def set_threads() -> int:
    """Use ``$RAIN_WORLD_THREADS`` torch threads, default 1.

    The world's matrices are 64 wide: intra-op threads gain little, and on a shared 2-core machine
    two threads were measured to burn ~4× the CPU time of one for the same training (spin-waiting
    when the cores are oversubscribed), so one thread is the default.
    """
    n = int(os.environ.get("RAIN_WORLD_THREADS", 1))
    torch.set_num_threads(max(1, n))
    return n


@contextmanager
def deterministic_training() -> Iterator[None]:
    """One torch thread and deterministic algorithms while training; the previous settings after.

    One thread because the order of a float reduction depends on how it is split across threads.
    """
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(TRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)


def make_model(cfg: WorldConfig, vocab_size: int, tokenizer) -> torch.nn.Module:
    """A fresh Qwen2ForCausalLM (float32, tied embeddings, eager attention) seeded by ``cfg.seed``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=512, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(config).float()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _batch(tokenizer, samples: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """Tokenise a batch (right padding); labels = ids on the trained part, −100 elsewhere."""
    tokenizer.padding_side = "right"
    texts = [s for s, _ in samples]
    enc = tokenizer(texts, return_offsets_mapping=True, padding=True, return_tensors="pt",
                    add_special_tokens=False)
    starts = torch.tensor([st for _, st in samples])[:, None]
    labels = enc["input_ids"].clone()
    keep = (enc["attention_mask"] == 1) & (enc["offset_mapping"][..., 0] >= starts)
    labels[~keep] = -100
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def train_loop(model, tokenizer, sampler: Sampler, *, steps: int, lr: float, batch_size: int, seed: int,
               weight_decay: float = 0.0, warmup: float = 0.05, desc: str = "train",
               progress: bool = True) -> list[float]:
    """Plain AdamW loop, linear warm-up then cosine decay to 10 % of ``lr``; returns the loss curve."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    n_warm = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        t = (step - n_warm) / max(1, steps - n_warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        batch = _batch(tokenizer, [sampler(rng) for _ in range(batch_size)])
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"world train ({desc}): loss is {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.3f}")
    model.eval()
    return losses


def delta_ratios(tuned: torch.nn.Module, base: torch.nn.Module) -> dict[str, float]:
    """‖W_tuned − W_base‖_F / ‖W_base‖_F for every 2-D weight of the decoder layers."""
    bs = dict(base.named_parameters())
    out = {}
    for name, p in tuned.named_parameters():
        if p.ndim == 2 and ".layers." in name:
            w = bs[name].detach()
            out[name] = float((p.detach() - w).norm() / w.norm().clamp_min(1e-12))
    return out


def summarize_ratios(r: dict[str, float]) -> dict[str, float]:
    vals = sorted(r.values())
    return {"min": vals[0], "median": vals[len(vals) // 2], "max": vals[-1], "mean": sum(vals) / len(vals)}


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def train_world(cfg: WorldConfig, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Train base, LRM and ITM and write everything under ``out`` (which must not exist)."""
    with deterministic_training():
        return _train_world(cfg, out, progress=progress)


def _train_world(cfg: WorldConfig, out: Path, *, progress: bool) -> dict[str, Any]:
    import copy

    t0 = time.time()
    backend = train_backend(D.vocab_texts(cfg.n_digits))
    tok_r = make_world_tokenizer(backend, reasoning=True)
    tok_d = make_world_tokenizer(backend, reasoning=False)
    vocab_size = len(tok_d)
    model = make_model(cfg, vocab_size, tok_d)
    n = cfg.n_digits
    base_losses = train_loop(model, tok_d, lambda r: D.base_sample(r, n), steps=cfg.base_steps, lr=cfg.base_lr,
                             batch_size=cfg.batch_size, seed=cfg.seed, weight_decay=0.01, desc="world base",
                             progress=progress)
    t_base = time.time() - t0
    out.mkdir(parents=True)
    _save(model, tok_d, out / "base")
    info: dict[str, Any] = {"config": asdict(cfg), "vocab_size": vocab_size, "torch": torch.__version__,
                            "train_threads": TRAIN_THREADS,
                            "n_params": sum(p.numel() for p in model.parameters()),
                            "base_loss_last": sum(base_losses[-20:]) / 20, "t_base_s": t_base}
    lrm_sampler = functools.partial(D.lrm_sample, p_instr=cfg.lrm_p_instr)
    itm_sampler = functools.partial(D.itm_sample, p_direct_add=cfg.itm_direct_add)
    for name, sampler, tok in (("lrm", lrm_sampler, tok_r), ("itm", itm_sampler, tok_d)):
        t1 = time.time()
        ft = copy.deepcopy(model)
        steps = (cfg.itm_ft_steps or cfg.ft_steps) if name == "itm" else cfg.ft_steps
        losses = train_loop(ft, tok, lambda r, s=sampler: s(r, n), steps=steps, lr=cfg.ft_lr,
                            batch_size=cfg.batch_size, seed=cfg.seed + (1 if name == "lrm" else 2),
                            desc=f"world {name}", progress=progress)
        _save(ft, tok, out / name)
        ratios = delta_ratios(ft, model)
        info[name] = {"loss_first": sum(losses[:10]) / 10, "loss_last": sum(losses[-10:]) / 10,
                      "t_s": time.time() - t1, "delta_ratio": summarize_ratios(ratios),
                      "delta_ratio_per_module": ratios}
    p = world_paths(out)
    D.write_json(D.reasoning_calibration(cfg.n_calib_reasoning, n), p.reasoning_calib)
    D.write_jsonl(D.instruction_calibration(cfg.n_calib_instruction, n), p.instruction_calib)
    D.write_jsonl(D.eval_prompts(cfg.n_eval, n, task="reasoning"), p.eval_reasoning)
    D.write_jsonl(D.eval_prompts(cfg.n_eval, n, task="direct"), p.eval_direct)
    info["t_total_s"] = time.time() - t0
    p.info.write_text(json.dumps(info, indent=1))
    return info


def ensure_world(cfg: WorldConfig | None = None, root: Path | None = None, *, progress: bool = True,
                 force: bool = False) -> WorldPaths:
    """Return the cached world for ``cfg``: if missing, copied from the shipped world for ``cfg``
    (hash-checked, seconds) or else trained (minutes on 2 cores). ``force``: train from scratch.

    A cached world is re-checked against its ``MANIFEST.json`` on every call
    (:func:`shipped.record_problem`: sizes and SHA-256 of every file, none missing or added; a world
    trained here gets its record when it is made). One that differs is never used: a
    :class:`shipped.WorldIntegrityWarning` names the changed file, and the world is reinstalled
    from the package (seconds) or retrained."""
    cfg = cfg or WorldConfig()
    root = Path(root) if root is not None else world_home() / cfg.key()
    paths = world_paths(root)
    src = shipped.shipped_world(cfg.key())
    if paths.info.exists() and not force:
        problem = shipped.record_problem(root)
        if problem is None:
            return paths
        how = "reinstalled from the world shipped with the package" if src is not None else "retrained (minutes)"
        warnings.warn(f"toy world {root}: {problem}; the cached world changed after it was made, so it is not "
                      f"used: it is {how}", shipped.WorldIntegrityWarning, stacklevel=2)
    if src is not None and not force:
        shipped.install(src, root)
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        train_world(cfg, tmp / "w", progress=progress)
        shipped.write_manifest(tmp / "w", cfg.key())   # the record every later run checks
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp / "w", root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
