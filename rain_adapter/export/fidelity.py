"""``rain fidelity``: what a low-rank factorisation costs on real forward passes.

The per-module Frobenius errors in ``adapter_config.json`` (``lowrank.py``) say how far ``B A`` is
from ``D``; this command says how far the *model's next-token distributions* move. At strength λ
(default 1) on calibration text, with the LRM loaded once:

    P_ref  = softmax(logits of LRM + λ · D_ref)       (the dense adapter)
    P_cand = softmax(logits of LRM + λ · B A)          (the low-rank adapter)
    P_0    = softmax(logits of the bare LRM)

    KL(P_ref ‖ P_cand) per token (mean, p95, max), top-1 agreement argmax P_ref = argmax P_cand,

and, as the yardstick, the adapter's own effect KL(P_ref ‖ P_0) and top-1 agreement ref vs bare.
``kl_ratio = mean KL(ref‖cand) / mean KL(ref‖bare)``: the fraction of the adapter's effect that
the factorisation gets wrong (0 = perfect, 1 = as far off as not attaching anything).

What is compared with what (a low-rank adapter cannot be compared with "its own dense
reconstruction": ``B A`` *is* its reconstruction, so the difference would be zero):

- ``ADAPTER --dense-twin DIR``: the low-rank ADAPTER against DIR, the same build stored dense
  (``rain build ... --storage dense``).
- ``ADAPTER --rank R`` / ``--rank-energy E`` (ADAPTER dense): ADAPTER against its compression at
  that rank, done in memory. This is how to choose a rank before building with it.
- a low-rank ADAPTER with neither: an error that says the above.

Text per sample (JSON list or JSONL with ``prompt`` and ``response``, optional ``reasoning`` /
``reason``): the LRM's chat template as in Stage 1 (``calibration.build_text``); plain
concatenation if the tokenizer has no template. Every position of every sample counts (up to
``--max-seq-len`` tokens, ``--max-samples`` samples).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..format.config import RainConfig
from ..format.delta import ModuleDelta
from ..format.dtypes import resolve_dtype
from ..format.store import load_adapter
from ..format.tokenizer import load_tokenizer


class FidelityError(ValueError):
    """Fidelity cannot be measured as asked; the message says what to pass instead."""


def calib_texts(path: str | Path, tokenizer, max_samples: int | None = None) -> list[str]:
    """Texts of the calibration samples (see the module doc)."""
    from ..merging.calibration import build_text, load_samples

    samples = load_samples(path, required=("prompt", "response"))
    if max_samples is not None:
        samples = samples[:max_samples]
    texts = []
    for s in samples:
        reasoning = s.get("reasoning", s.get("reason", "")) or ""
        if getattr(tokenizer, "chat_template", None):
            texts.append(build_text(tokenizer, {"prompt": s["prompt"], "reasoning": reasoning,
                                                "response": s["response"]}))
        else:
            texts.append(s["prompt"] + "\n" + (reasoning + "\n" if reasoning else "") + s["response"])
    return texts


def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits[0].float(), dim=-1)   # [T, vocab]


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) per row, from log-probabilities ``[T, vocab]`` (float32; clamped at 0)."""
    return (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0.0)


def compare(
    model: nn.Module,
    token_ids: Sequence[Sequence[int]],
    reference: tuple[RainConfig, dict[str, ModuleDelta]],
    candidate: tuple[RainConfig, dict[str, ModuleDelta]],
    *,
    lam: float = 1.0,
    check_fingerprint: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Per-token KL(ref ‖ cand) and top-1 agreement at λ over ``token_ids``, plus the bare-model yardstick.

    The adapters are attached one after the other for each sample (deltas stay in memory), so only
    one sample's ``[T, vocab]`` log-probabilities are alive at a time.
    """
    from tqdm.auto import tqdm

    from ..runtime.model import RainAdapter

    device = next(model.parameters()).device
    kl_c, kl_0, agree_c, agree_0 = [], [], 0, 0
    n_tok = 0
    first = True
    for ids in tqdm(token_ids, desc="fidelity", unit="sample", disable=not progress):
        x = torch.tensor([list(ids)], device=device)
        bare = _logprobs(model, x)
        outs = []
        for adapter in (reference, candidate):
            rm = RainAdapter.attach(model, adapter, lam=lam, check_fingerprint=check_fingerprint and first)
            try:
                outs.append(_logprobs(rm, x))
            finally:
                rm.detach()
        first = False
        ref, cand = outs
        kl_c.append(_kl(ref, cand).cpu())
        kl_0.append(_kl(ref, bare).cpu())
        top = ref.argmax(-1)
        agree_c += int((top == cand.argmax(-1)).sum())
        agree_0 += int((top == bare.argmax(-1)).sum())
        n_tok += x.shape[1]
    if n_tok == 0:
        raise FidelityError("no tokens to compare (empty calibration set?)")
    kc, k0 = torch.cat(kl_c).double(), torch.cat(kl_0).double()
    if not (torch.isfinite(kc).all() and torch.isfinite(k0).all()):
        raise FidelityError("non-finite KL: the model produced NaN/Inf logits")
    mean_c, mean_0 = float(kc.mean()), float(k0.mean())
    return {
        "lambda": lam,
        "samples": len(token_ids),
        "tokens": n_tok,
        "kl_mean": mean_c,
        "kl_p95": float(torch.quantile(kc, 0.95)),
        "kl_max": float(kc.max()),
        "top1_agreement": agree_c / n_tok,
        "effect_kl_mean": mean_0,
        "effect_top1_agreement": agree_0 / n_tok,
        "kl_ratio": mean_c / mean_0 if mean_0 > 0 else (0.0 if mean_c == 0 else math.inf),
    }


def run_fidelity(
    lrm: str | Path,
    adapter: str | Path,
    calib: str | Path,
    *,
    dense_twin: str | Path | None = None,
    rank: int | None = None,
    rank_energy: float | None = None,
    max_rank: int | None = None,
    lam: float = 1.0,
    max_samples: int | None = 16,
    max_seq_len: int = 512,
    device: str | None = None,
    dtype: str = "float32",
    check_fingerprint: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Load the LRM and the adapters (see the module doc for the modes) and :func:`compare` them."""
    from transformers import AutoModelForCausalLM

    cfg, deltas = load_adapter(adapter)
    is_low = any(d.is_lowrank for d in deltas.values())
    compressed = rank is not None or rank_energy is not None
    if dense_twin is not None and compressed:
        raise FidelityError("give --dense-twin or --rank/--rank-energy, not both")
    fid_report = None
    if dense_twin is not None:
        tcfg, tdeltas = load_adapter(dense_twin)
        if any(d.is_lowrank for d in tdeltas.values()):
            raise FidelityError(f"--dense-twin {dense_twin}: is itself low-rank; pass the --storage dense build")
        missing = sorted(set(deltas) ^ set(tdeltas))
        if missing:
            raise FidelityError(f"{adapter} and its dense twin {dense_twin} target different modules, e.g. {missing[0]!r}")
        reference, candidate, mode = (tcfg, tdeltas), (cfg, deltas), "dense-twin"
    elif compressed:
        if is_low:
            raise FidelityError(
                f"{adapter} is already low-rank; --rank/--rank-energy compress a *dense* adapter. To measure "
                "this one, pass --dense-twin DIR (the same build with --storage dense)")
        from ..merging.lowrank import compress

        low, fid_report = compress(deltas, rank=rank, rank_energy=rank_energy, max_rank=max_rank, progress=progress)
        reference, candidate, mode = (cfg, deltas), (cfg, low), "compressed-in-memory"
    else:
        if is_low:
            raise FidelityError(
                f"{adapter} is low-rank and B·A is its own dense reconstruction (the difference would be 0): "
                "pass --dense-twin DIR (the same build with --storage dense)")
        raise FidelityError(
            f"{adapter} is dense: pass --rank R or --rank-energy E to see what that rank costs, or --dense-twin")
    torch_dtype = resolve_dtype(dtype, error=FidelityError)
    tok = load_tokenizer(lrm)
    model = AutoModelForCausalLM.from_pretrained(str(lrm), dtype=torch_dtype).eval()
    if device is not None:
        model.to(device)
    texts = calib_texts(calib, tok, max_samples)
    use_special = not getattr(tok, "chat_template", None)
    ids = [tok(t, add_special_tokens=use_special).input_ids[:max_seq_len] for t in texts]
    ids = [x for x in ids if len(x) >= 2]
    result = compare(model, ids, reference, candidate, lam=lam, check_fingerprint=check_fingerprint,
                     progress=progress)
    result.update({"mode": mode, "adapter": str(adapter), "dense_twin": str(dense_twin) if dense_twin else None,
                   "rank": rank, "rank_energy": rank_energy, "max_rank": max_rank, "calib": str(calib)})
    if fid_report is not None:
        result["weights"] = fid_report["overall"]
    elif cfg.fidelity.get("overall"):
        result["weights"] = cfg.fidelity["overall"]
    return result


def format_result(r: dict[str, Any]) -> str:
    """The human-readable report of a :func:`run_fidelity` result."""
    lines = [
        f"fidelity at λ = {r['lambda']:g} on {r['samples']} sample(s), {r['tokens']} token(s) [{r['mode']}]",
        f"  KL(dense ‖ low-rank) per token: mean {r['kl_mean']:.3e}, p95 {r['kl_p95']:.3e}, max {r['kl_max']:.3e}",
        f"  top-1 agreement dense vs low-rank: {r['top1_agreement']:.2%}",
        f"  adapter effect (dense vs bare LRM): KL mean {r['effect_kl_mean']:.3e}, top-1 agreement "
        f"{r['effect_top1_agreement']:.2%}",
        f"  kl_ratio (share of the effect the factorisation gets wrong): {r['kl_ratio']:.3%}",
    ]
    w = r.get("weights")
    if w:
        lines.append(f"  weights: mean rank {w['mean_rank']:.1f}, energy kept {w['energy_kept']:.4f}, "
                     f"rel Frobenius error {w['rel_error']:.4f}, params {w['params_lowrank'] / max(w['params_dense'], 1):.1%} of dense")
    return "\n".join(lines)


__all__ = ["FidelityError", "calib_texts", "compare", "format_result", "run_fidelity"]
