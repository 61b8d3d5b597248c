"""Stage 2: instruction-attention guided coefficients α per attention head (docs/DESIGN.md §6.3).

Pipeline (``run_stage2``; steps 1-2 are :func:`stage2_statistics`, 3-4 :func:`stage2_alpha`):

1. Prepare the instruction calibration set (:mod:`rain_adapter.merging.spans`): one tokenisation per
   sample, per instruction i the prompt tokens I_i, related response tokens R_i and unrelated
   response tokens U_i.
2. Attach the Stage 1 deltas to the LRM through ``RainLinear`` (no weight rewrite) and, per
   sample, run one forward at λ = 1 (and one at λ = 0 for ``alpha_grad="gain"``) with the row-only
   attention probe (:mod:`rain_adapter.merging.attention`):

       a^{ℓ,h} = Σ_{t∈R} Σ_{τ∈I} P[t, τ] / (|I||R|)     u^{ℓ,h} = Σ_{t∈U} Σ_{τ∈I} P[t, τ] / (|I||U|)

   (queries = response tokens, keys = instruction prompt tokens).  E_x is the mean over the
   (sample, instruction) pairs where the statistic is defined (R_i resp. U_i non-empty).
3. Closed form per head (:func:`alpha_from_stats`, in :mod:`rain_adapter.merging.alpha`)::

       g = E[a1] − ρ E[u1]                                   ("level", default)
       g = E[a1 − a0] − ρ E[u1 − u0]                         ("gain")
       H = 1 + E[u1]
       α_raw = g / H
       "mean" (default): α = clip(c·α_raw / mean_{ℓ,h}(α_raw), 0, α_max), the scale c solving
                         mean_{ℓ,h}(α) = 1 exactly (c = 1 when nothing is clipped)
       "none":           α = clip(α_raw, 0, α_max)

   so under "mean" λ means the same as for task arithmetic (mean coefficient 1 over all heads);
   α's spread (mean, std, min, max, shares at α_max / 0, c) goes to ``config.stage2["alpha_stats"]``.

4. Fold α into the stored deltas (:func:`fold_alpha`): q rows / o columns of head h get α_h,
   k/v rows of kv head j get mean_{h: h // n_rep = j} α_h, gate/up/down get the layer mean.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..format.arch import attention_geometry, module_layer, module_role
from .alpha import ALPHA_GRADS, ALPHA_NORMS, Stage2Error, alpha_from_stats, alpha_with_stats, format_alpha_stats
from .attention import AttentionPair, attention_pair_stats
from ..format.delta import ModuleDelta
from .spans import CalibSample, prepare_instruction_samples

__all__ = [
    "Stage2Error", "AttentionStats", "collect_attention_stats", "alpha_from_stats", "fold_alpha",
    "fold_alpha_all", "run_stage2", "stage2_statistics", "stage2_alpha", "format_alpha_table", "ALPHA_GRADS",
    "ALPHA_NORMS", "alpha_with_stats",
]

#: minimum fraction of (sample, instruction) pairs whose alignment a must be > 0
MIN_POSITIVE_FRACTION = 0.9


class AttentionStats:
    """Running sums of a and u per (layer, head), at λ = 1 (and λ = 0 for the gain pass)."""

    def __init__(self, n_layers: int, n_heads: int) -> None:
        z = lambda: torch.zeros(n_layers, n_heads, dtype=torch.float64)  # noqa: E731
        self.a1, self.u1, self.a0, self.u0 = z(), z(), z(), z()
        self.n_a = 0
        self.n_u = 0
        self.n_a_positive = 0

    def add(self, a1: Tensor | None, u1: Tensor | None, a0: Tensor | None = None, u0: Tensor | None = None) -> None:
        """Add one pair's statistics (each ``[L, H]`` or None when undefined)."""
        if a1 is not None:
            self.a1 += a1.double()
            self.n_a += 1
            self.n_a_positive += int(bool(a1.double().mean() > 0))
            if a0 is not None:
                self.a0 += a0.double()
        if u1 is not None:
            self.u1 += u1.double()
            self.n_u += 1
            if u0 is not None:
                self.u0 += u0.double()

    def means(self) -> dict[str, Tensor]:
        """E[a1], E[u1], E[a0], E[u0] as ``[L, H]`` float64 (u's are 0 when no U spans were seen)."""
        na, nu = max(self.n_a, 1), max(self.n_u, 1)
        return {"a1": self.a1 / na, "u1": self.u1 / nu, "a0": self.a0 / na, "u0": self.u0 / nu}


# ----------------------------------------------------------------------------------------------
# folding
# ----------------------------------------------------------------------------------------------
O_ALPHA_MODES = ("mean", "head")


def fold_alpha(name: str, md: ModuleDelta, alpha: Tensor, n_heads: int, n_kv_heads: int,
               head_dim: int, *, o_alpha: str = "mean") -> ModuleDelta:
    """Fold the per-head α ``[n_heads]`` of the module's layer into its delta.

    q: rows of head h (``[h·hD, (h+1)·hD)``, out dim) × α_h — dense ``delta`` rows, low-rank ``lora_B``
    rows, bias entries.  k / v: rows of kv head j × mean_{h // n_rep = j} α_h.  gate / up / down:
    × mean(α) (low-rank: ``lora_B`` only).

    o: ``o_alpha="mean"`` (default) scales the whole delta by the layer mean; ``"head"`` scales the
    *input* columns of head h by α_h (DESIGN §6.3 as first written). Column scaling breaks Stage 1's
    constraint: D⊥X = 0 does not imply D⊥ diag(α) X = 0, so the thinking-position outputs of o_proj
    would change again (measured on the tiny triple: 8.9e-5 relative change vs 2.5e-8 with row
    scaling). Row scaling (q, k, v, MLP, o with "mean") keeps diag(s) D⊥ X = 0 exactly.
    Computed in float32, returned in the delta's dtype.
    """
    if o_alpha not in O_ALPHA_MODES:
        raise Stage2Error(f"o_alpha must be one of {O_ALPHA_MODES}, got {o_alpha!r}")
    role = module_role(name)
    alpha = alpha.detach().float().cpu()
    if alpha.shape != (n_heads,):
        raise Stage2Error(f"{name}: α has shape {tuple(alpha.shape)}, expected [{n_heads}]")
    out_dim, in_dim = md.shape
    n_rep = n_heads // n_kv_heads
    mean = alpha.mean()

    def scale(t: Tensor | None, s: Tensor, dim: int) -> Tensor | None:
        if t is None:
            return None
        s = s.to(device=t.device)
        shape = [1] * t.ndim
        shape[dim] = -1
        return (t.float() * (s.view(shape) if s.ndim else s)).to(t.dtype)

    def scaled(s: Tensor, dim: int, bias_s: Tensor) -> ModuleDelta:
        """D scaled along ``dim`` (0: output rows, 1: input columns) by ``s``, the bias by ``bias_s``.
        Low rank: rows live in lora_B [out, r], columns in lora_A [r, in]."""
        key = "delta" if not md.is_lowrank else ("lora_B" if dim == 0 else "lora_A")
        return replace(md, **{key: scale(getattr(md, key), s, dim)}, bias=scale(md.bias, bias_s, 0))

    if role in ("q", "k", "v"):
        per = alpha if role == "q" else alpha.view(n_kv_heads, n_rep).mean(1)
        rows = per.repeat_interleave(head_dim)
        if rows.numel() != out_dim:
            raise Stage2Error(f"{name}: out dim {out_dim} != {per.numel()} heads × head_dim {head_dim}")
        return scaled(rows, 0, rows)
    if role == "o" and o_alpha == "head":
        cols = alpha.repeat_interleave(head_dim)
        if cols.numel() != in_dim:
            raise Stage2Error(f"{name}: in dim {in_dim} != {n_heads} heads × head_dim {head_dim}")
        return scaled(cols, 1, mean)
    # MLP: the layer mean
    return scaled(mean, 0, mean)


def fold_alpha_all(deltas: dict[str, ModuleDelta], alpha: Tensor, n_heads: int, n_kv_heads: int,
                   head_dim: int, *, o_alpha: str = "mean") -> dict[str, ModuleDelta]:
    """:func:`fold_alpha` for every module; ``alpha`` is ``[n_layers, n_heads]``."""
    out = {}
    for name, md in deltas.items():
        layer = module_layer(name)
        if not 0 <= layer < alpha.shape[0]:
            raise Stage2Error(f"{name}: layer {layer} has no α (table has {alpha.shape[0]} layers)")
        out[name] = fold_alpha(name, md, alpha[layer], n_heads, n_kv_heads, head_dim, o_alpha=o_alpha)
    return out


# ----------------------------------------------------------------------------------------------
# the passes
# ----------------------------------------------------------------------------------------------
def _pairs(sample: CalibSample) -> tuple[list[AttentionPair], list[tuple[int | None, int | None]]]:
    """AttentionPairs of a sample and, per instruction group, (index of its a pair, of its u pair)."""
    pairs: list[AttentionPair] = []
    index: list[tuple[int | None, int | None]] = []
    for g in sample.groups:
        ia = iu = None
        if g.related_tokens.numel():
            ia = len(pairs)
            pairs.append(AttentionPair(g.related_tokens, g.prompt_tokens))
        if g.unrelated_tokens.numel():
            iu = len(pairs)
            pairs.append(AttentionPair(g.unrelated_tokens, g.prompt_tokens))
        index.append((ia, iu))
    return pairs, index


def collect_attention_stats(model, samples: Sequence[CalibSample], *, n_layers: int, n_heads: int,
                            gain: bool = False, device=None, progress: bool = True) -> AttentionStats:
    """Run the probe over ``samples``.  ``model`` is a ``RainModel`` (λ = 1 pass, and λ = 0 when
    ``gain``) or, with ``gain=False``, any HF causal LM."""
    stats = AttentionStats(n_layers, n_heads)
    it = samples
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(samples, desc="stage2 attention", unit="sample")
    for s in it:
        pairs, index = _pairs(s)
        if not pairs:
            continue
        ids = s.input_ids.to(device) if device is not None else s.input_ids
        if gain:
            model.set_lambda(1.0)
        st1 = attention_pair_stats(model, ids, pairs, n_layers=n_layers)
        st0 = None
        if gain:
            model.set_lambda(0.0)
            try:
                st0 = attention_pair_stats(model, ids, pairs, n_layers=n_layers)
            finally:
                model.set_lambda(1.0)
        if not torch.isfinite(st1).all() or (st0 is not None and not torch.isfinite(st0).all()):
            raise Stage2Error(f"sample {s.sample_id!r}: attention statistics missing for some layer (NaN)")
        for ia, iu in index:
            stats.add(st1[ia] if ia is not None else None, st1[iu] if iu is not None else None,
                      st0[ia] if (st0 is not None and ia is not None) else None,
                      st0[iu] if (st0 is not None and iu is not None) else None)
    return stats


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


#: ρ of g = a − ρ·u. The paper uses 0.5; the Stage 2 trial (bench/stage2_trial.py, bench/RESULTS.md)
#: found ρ = 0 keeps more accuracy at equal compliance in 5 of 6 toy worlds (pooled +0.10 / +0.08) and
#: the same sign on two held-out worlds, so 0 is the default; ``--rho 0.5`` is the paper's setting.
DEFAULT_RHO = 0.0


def stage2_statistics(model, tokenizer, deltas: dict[str, ModuleDelta], instruction_calib, *,
                      alpha_grad: str = "level", max_samples: int | None = None, max_seq_len: int = 4096,
                      device=None, progress: bool = True) -> dict:
    """Steps 1-2 of :func:`run_stage2`, the attention passes: ``{"a1", "u1"}`` (and ``"a0", "u0"``
    for ``alpha_grad="gain"``) = E[·] as ``[L, H]`` float64, ``"n_a"``, ``"n_u"``, ``"n_a_positive"``
    (pair counts) and ``"samples"`` (the :class:`SpanReport` as a dict). Nothing here depends on ρ,
    α_max, ``alpha_norm`` or ``o_alpha``, which is what lets ``--feature-cache`` keep it (§5.7)."""
    from ..format.config import RainConfig
    from ..runtime.model import RainAdapter

    n_heads = attention_geometry(model.config)[0]
    n_layers = int(model.config.num_hidden_layers)
    samples, report = prepare_instruction_samples(
        instruction_calib if isinstance(instruction_calib, (str, Path)) or instruction_calib is None
        else list(instruction_calib), tokenizer, max_seq_len=max_seq_len, max_samples=max_samples)
    if report.pairs_related == 0:
        raise Stage2Error(f"no instruction has both prompt spans and related response spans "
                          f"({report.records} records): the alignment a is undefined")

    roles = sorted({module_role(n) for n in deltas})
    layers = sorted({module_layer(n) for n in deltas})
    lowrank = any(d.is_lowrank for d in deltas.values())
    cfg = RainConfig(target_modules=roles, layers=layers, storage="lowrank" if lowrank else "dense",
                     rank=max((d.rank or 0) for d in deltas.values()) if lowrank else None,
                     method="rain-stage2-probe")
    dev = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    rain = RainAdapter.attach(model, (cfg, deltas), lam=1.0, check_fingerprint=False)
    try:
        stats = collect_attention_stats(rain, samples, n_layers=n_layers, n_heads=n_heads,
                                        gain=alpha_grad == "gain", device=dev, progress=progress)
    finally:
        rain.detach()
        model.train(was_training)

    if stats.n_a == 0:
        raise Stage2Error("no alignment statistic collected (no sample with related response spans)")
    if stats.n_a_positive / stats.n_a < MIN_POSITIVE_FRACTION:
        raise Stage2Error(
            f"alignment a > 0 on only {stats.n_a_positive}/{stats.n_a} instruction pairs "
            f"(< {MIN_POSITIVE_FRACTION:.0%}): the attention statistics are broken")
    m = stats.means()
    keep = ("a1", "u1", "a0", "u0") if alpha_grad == "gain" else ("a1", "u1")
    return {**{k: m[k] for k in keep}, "n_a": stats.n_a, "n_u": stats.n_u, "n_a_positive": stats.n_a_positive,
            "samples": report.to_dict()}


def stage2_alpha(deltas: dict[str, ModuleDelta], m: dict, geometry: tuple[int, int, int], *, rho: float,
                 alpha_grad: str, alpha_norm: str, alpha_max: float, o_alpha: str, max_samples: int | None,
                 max_seq_len: int, progress: bool = True) -> tuple[dict[str, ModuleDelta], dict]:
    """Steps 3-4 of :func:`run_stage2`: α from the statistics ``m`` (:func:`stage2_statistics`),
    folded into ``deltas``, and the ``config["stage2"]`` summary (without ``seconds``)."""
    n_heads, n_kv, head_dim = geometry
    n_layers = int(m["a1"].shape[0])
    gain = alpha_grad == "gain"
    res = alpha_with_stats(m["a1"], m["u1"], rho=rho, alpha_grad=alpha_grad, a0=m["a0"] if gain else None,
                           u0=m["u0"] if gain else None, alpha_norm=alpha_norm, alpha_max=alpha_max)
    alpha, raw, norm = res.alpha, res.raw, res.normaliser
    if progress:
        print("[rain build] stage2: " + format_alpha_stats(res.stats, alpha_max), file=sys.stderr, flush=True)
    folded = fold_alpha_all(deltas, alpha, n_heads, n_kv, head_dim, o_alpha=o_alpha)

    def table(t: Tensor) -> dict[str, list[float]]:
        return {str(i): [round(float(x), 6) for x in t[i]] for i in range(t.shape[0])}

    summary = {
        "method": "instruction-attention",
        "alpha_grad": alpha_grad, "alpha_norm": alpha_norm, "rho": float(rho), "alpha_max": float(alpha_max),
        "max_seq_len": int(max_seq_len), "max_samples": max_samples,
        "o_alpha": o_alpha,
        "granularity": ("head (q rows" + (", o cols" if o_alpha == "head" else "") + "); kv head = mean of its "
                        "q heads; mlp" + ("" if o_alpha == "head" else " and o") + " = layer mean"),
        "n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": head_dim,
        "alpha": table(alpha),
        "alpha_layer_mean": {str(i): round(float(alpha[i].mean()), 6) for i in range(n_layers)},
        "alpha_raw_normaliser": norm,
        "alpha_stats": res.stats,
        "alpha_clipped": {"low": int((raw / norm < 0).sum()), "high": int((raw / norm > alpha_max).sum())},
        "mean_a": float(m["a1"].mean()), "mean_u": float(m["u1"].mean()),
        "pairs_a": m["n_a"], "pairs_u": m["n_u"], "frac_a_positive": round(m["n_a_positive"] / m["n_a"], 4),
        "samples": m["samples"],
    }
    if gain:
        summary["mean_a0"] = float(m["a0"].mean())
        summary["mean_u0"] = float(m["u0"].mean())
    return folded, summary


def run_stage2(model, tokenizer, deltas: dict[str, ModuleDelta], instruction_calib, *, rho: float = DEFAULT_RHO,
               alpha_grad: str = "level", alpha_norm: str = "mean", alpha_max: float = 1.5,
               max_samples: int | None = None, max_seq_len: int = 4096, device=None, progress: bool = True,
               o_alpha: str = "mean", stats_cache=None) -> tuple[dict[str, ModuleDelta], dict]:
    """Stage 2 end to end: (α-folded deltas, ``config["stage2"]`` summary).

    ``model``: the LRM (HF causal LM, not already wrapped); the deltas are attached through
    ``RainLinear`` for the passes and detached afterwards (also on error), so the model comes back
    unchanged.  ``instruction_calib``: a JSONL path or a list of records (see :mod:`rain_adapter.merging.spans`).
    ``stats_cache``: optional hook with ``load() -> dict | None`` and ``save(dict)`` for the result of
    :func:`stage2_statistics` (``feature_cache.Stage2StatsCache``); a hit runs no attention pass
    and the summary records ``"stats_from_cache": True``.
    """
    from ..runtime.model import RainModel

    t0 = time.perf_counter()
    if alpha_grad not in ALPHA_GRADS:
        raise Stage2Error(f"alpha_grad must be one of {ALPHA_GRADS}, got {alpha_grad!r}")
    if alpha_norm not in ALPHA_NORMS:
        raise Stage2Error(f"alpha_norm must be one of {ALPHA_NORMS}, got {alpha_norm!r}")
    if alpha_norm == "mean" and not alpha_max >= 1:   # fail before the passes: mean 1 is unreachable
        raise Stage2Error(f"alpha_max = {alpha_max!r} < 1: α clipped to [0, alpha_max] cannot have mean 1 "
                          f"(alpha_norm='mean'); raise --alpha-max or use --alpha-norm none")
    if isinstance(model, RainModel):
        raise Stage2Error("run_stage2 needs the bare LRM; detach() the attached adapter first")
    if not deltas:
        raise Stage2Error("run_stage2: no deltas given")
    geometry = attention_geometry(model.config)
    m = stats_cache.load() if stats_cache is not None else None
    if m is not None and tuple(m["a1"].shape) != (int(model.config.num_hidden_layers), geometry[0]):
        m = None   # cannot happen with an intact key; never fold a table of the wrong shape
    from_cache = m is not None
    if m is None:
        m = stage2_statistics(model, tokenizer, deltas, instruction_calib, alpha_grad=alpha_grad,
                              max_samples=max_samples, max_seq_len=max_seq_len, device=device, progress=progress)
        if stats_cache is not None:
            stats_cache.save(m)
    folded, summary = stage2_alpha(deltas, m, geometry, rho=rho, alpha_grad=alpha_grad, alpha_norm=alpha_norm,
                                   alpha_max=alpha_max, o_alpha=o_alpha, max_samples=max_samples,
                                   max_seq_len=max_seq_len, progress=progress)
    summary["stats_from_cache"] = from_cache
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return folded, summary


# ----------------------------------------------------------------------------------------------
# display (for `rain info`)
# ----------------------------------------------------------------------------------------------
def format_alpha_table(summary: dict, top: int = 5) -> str:
    """Human-readable Stage 2 summary: method, counts, per-layer mean α, top / bottom heads."""
    if not summary or not isinstance(summary.get("alpha"), dict) or not summary["alpha"]:
        why = (summary or {}).get("reason", "not run")
        return f"stage2: not applied ({why}; α = 1)"
    table = {int(k): v for k, v in summary["alpha"].items()}
    heads = [(a, l_idx, h) for l_idx, row in table.items() for h, a in enumerate(row)]
    lines = [
        f"stage2: {summary.get('method', '?')}  grad={summary.get('alpha_grad')}  norm={summary.get('alpha_norm')}  "
        f"rho={summary.get('rho')}  alpha_max={summary.get('alpha_max')}",
    ]
    s = summary.get("samples", {})
    if s:
        lines.append(
            f"  samples used {s.get('samples_used')}/{s.get('records')} (too long {s.get('skipped_too_long')}, "
            f"no spans {s.get('skipped_no_spans')}); pairs a={summary.get('pairs_a')} u={summary.get('pairs_u')}; "
            f"mean a={summary.get('mean_a', float('nan')):.4g} u={summary.get('mean_u', float('nan')):.4g}")
    st = summary.get("alpha_stats")
    if not isinstance(st, dict):   # adapters built before alpha_stats was recorded: from the table
        a = torch.tensor([x for row in table.values() for x in row], dtype=torch.float64)
        amax = float(summary.get("alpha_max", float("inf")))
        st = {"n": a.numel(), "mean": float(a.mean()), "std": float(a.std(unbiased=False)), "min": float(a.min()),
              "max": float(a.max()), "frac_at_max": float((a >= amax - 1e-6).double().mean()),
              "frac_at_zero": float((a <= 0).double().mean())}
    lines.append("  " + format_alpha_stats(st, summary.get("alpha_max"))
                 + ("" if "scale" in st else " (renormalisation after clipping not recorded)"))
    lines.append("  per-layer mean α: " + " ".join(
        f"L{l_idx}:{sum(row) / len(row):.3f}" for l_idx, row in sorted(table.items())))
    ranked = sorted(heads, reverse=True)
    k = min(top, len(ranked))
    lines.append("  top heads:    " + ", ".join(f"L{l_idx}.H{h}={a:.3f}" for a, l_idx, h in ranked[:k]))
    lines.append("  bottom heads: " + ", ".join(f"L{l_idx}.H{h}={a:.3f}" for a, l_idx, h in ranked[::-1][:k]))
    return "\n".join(lines)
