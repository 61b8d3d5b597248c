"""Row-only attention statistics probe (docs/DESIGN.md §6.3).

For a single sequence (batch 1) and a list of *pairs* ``(queries Q_p, keys K_p)`` of token
positions, this module computes, for every decoder layer ℓ and attention head h,

    s_p^{ℓ,h} = Σ_{t ∈ Q_p} Σ_{τ ∈ K_p} P^{ℓ,h}[t, τ] / (|Q_p| · |K_p|)

where ``P`` is the model's *real* post-softmax attention: rows = queries, after RoPE, with the
model's own ``scaling``, GQA grouping (q head h reads kv head ``h // n_rep``), the causal / sliding
window / padding mask and, when the model passes one, logit soft-capping.  Stage 2 uses two pairs
per instruction: (related response tokens R, instruction prompt tokens I) gives the alignment
``a`` and (unrelated response tokens U, I) gives the leakage ``u``.

How: transformers' attention modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(
config._attn_implementation, eager_attention_forward)(module, query [B, H, T, hD] (post-RoPE),
key [B, KV, T, hD], value, attention_mask, scaling=..., ...)``.  For the duration of one forward
we register a probe under ``rain_probe_<orig>`` (with the mask function of the original
implementation, so the probe receives exactly the mask the original kernel would) and switch
``config._attn_implementation`` to it.  The probe computes only the needed query rows against
all keys (the true softmax denominator), in float32 and in chunks of rows, reduces them
immediately to the per-pair sums, and then calls the original kernel so the forward is unchanged.
No ``[T, T]`` matrix is ever built for all heads; peak extra memory is ``H · chunk · T`` floats.
The original implementation is restored afterwards, also on error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["AttentionPair", "attention_pair_stats", "attention_probe", "PROBE_PREFIX"]

PROBE_PREFIX = "rain_probe_"


@dataclass
class AttentionPair:
    """One statistic to collect: query positions (rows of P) and key positions (columns).

    ``queries`` / ``keys`` are 1-D integer tensors (or sequences) of token positions in ``[0, T)``.
    """

    queries: Tensor | Sequence[int]
    keys: Tensor | Sequence[int]


@dataclass
class _Recorder:
    """Per-forward state of the probe: pair membership matrices and the accumulated sums."""

    rows: Tensor                      # [n_rows] sorted unique query positions (long)
    row_member: Tensor                # [n_pairs, n_rows] float32, 1 if the row belongs to pair p
    key_member: Tensor                # [T, n_pairs] float32, 1 if the key belongs to pair p
    norm: Tensor                      # [n_pairs] float32, |Q_p| · |K_p|
    seq_len: int
    chunk: int
    orig: str                         # original attention implementation name
    results: dict[int, Tensor] = field(default_factory=dict)   # layer_idx -> [n_pairs, H]
    calls: int = 0


_ACTIVE: list[_Recorder] = []


# ----------------------------------------------------------------------------------------------
# the probe
# ----------------------------------------------------------------------------------------------
def _generic_eager(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                   attention_mask: Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """Plain eager attention (used only when the model's modeling file has no eager function)."""
    n_rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(n_rep, dim=1)
    v = value.repeat_interleave(n_rep, dim=1)
    w = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            w = w.masked_fill(~attention_mask, torch.finfo(w.dtype).min)
        else:
            w = w + attention_mask
    else:
        T, S = w.shape[-2:]
        causal = torch.ones(T, S, dtype=torch.bool, device=w.device).tril(S - T)
        w = w.masked_fill(~causal, torch.finfo(w.dtype).min)
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(w, v).transpose(1, 2).contiguous()
    return out, w


def _original_fn(module: nn.Module, orig: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if orig != "eager" and orig in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[orig]
    mod = sys.modules.get(type(module).__module__)
    fn = getattr(mod, "eager_attention_forward", None) if mod is not None else None
    return fn if fn is not None else _generic_eager


def _allowed_keys(mask: Tensor | None, rows: Tensor, seq_len: int, sliding_window: int | None
                  ) -> tuple[Tensor | None, Tensor | None]:
    """Mask for the selected rows: (bool allowed [h, c, T] or None, additive float [h, c, T] or None)."""
    if mask is None:
        kv = torch.arange(seq_len, device=rows.device)
        allowed = kv[None, :] <= rows[:, None]
        if sliding_window is not None:
            allowed &= kv[None, :] > rows[:, None] - int(sliding_window)
        return allowed[None], None
    if mask.ndim == 2:          # [B, T] padding mask (flash-style): causal + padding
        kv = torch.arange(seq_len, device=rows.device)
        allowed = (kv[None, :] <= rows[:, None]) & mask[0].bool()[None, :]
        if sliding_window is not None:
            allowed &= kv[None, :] > rows[:, None] - int(sliding_window)
        return allowed[None], None
    if mask.ndim != 4:
        raise ValueError(f"rain_adapter.merging.attention: unsupported attention mask shape {tuple(mask.shape)}")
    m = mask[0][:, rows, :]     # [1 or H, c, T_k]
    m = m[..., -seq_len:] if m.shape[-1] != seq_len else m
    if m.dtype == torch.bool:
        return m, None
    return None, m.float()


def _record(rec: _Recorder, module: nn.Module, query: Tensor, key: Tensor,
            attention_mask: Tensor | None, scaling: float | None, kwargs: dict) -> None:
    """Accumulate Σ_{t∈Q_p} Σ_{τ∈K_p} P[t, τ] / (|Q_p||K_p|) for every pair p into rec.results."""
    if query.shape[0] != 1:
        raise ValueError("rain_adapter.merging.attention: the probe supports batch size 1 only "
                         f"(got query of shape {tuple(query.shape)})")
    B, H, Tq, hD = query.shape
    KV, Tk = key.shape[1], key.shape[2]
    if Tq != rec.seq_len or Tk != rec.seq_len:
        raise ValueError(f"rain_adapter.merging.attention: expected a full forward over {rec.seq_len} tokens without "
                         f"cache, got query length {Tq} and key length {Tk}")
    if H % KV:
        raise ValueError(f"rain_adapter.merging.attention: {H} query heads not a multiple of {KV} kv heads")
    n_rep = H // KV
    if scaling is None:
        scaling = hD ** -0.5
    softcap = kwargs.get("softcap")
    sliding_window = kwargs.get("sliding_window")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError("rain_adapter.merging.attention: attention sinks are not supported by the probe")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        layer = rec.calls
    rec.calls += 1

    k = key[0].float()                                   # [KV, T, hD]
    kT = k.transpose(1, 2)                               # [KV, hD, T]
    n_pairs = rec.row_member.shape[0]
    out = torch.zeros(n_pairs, H, dtype=torch.float32, device=query.device)
    rows = rec.rows.to(query.device)
    row_member = rec.row_member.to(query.device)
    key_member = rec.key_member.to(query.device)
    for c0 in range(0, rows.numel(), rec.chunk):
        r = rows[c0:c0 + rec.chunk]
        c = r.numel()
        q = query[0][:, r, :].float()                    # [H, c, hD]
        logits = torch.matmul(q.reshape(KV, n_rep * c, hD), kT).reshape(H, c, Tk) * float(scaling)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        allowed, additive = _allowed_keys(attention_mask, r, Tk, sliding_window)
        if additive is not None:
            logits = logits + additive
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(logits, dim=-1)                # [H, c, T] float32, true denominator
        p = torch.nan_to_num(p, nan=0.0)                 # fully masked rows (never for causal LMs)
        s = torch.matmul(p, key_member)                  # [H, c, n_pairs]
        out += torch.einsum("pc,hcp->ph", row_member[:, c0:c0 + c], s)
    out /= rec.norm.to(out.device)[:, None]
    rec.results[int(layer)] = out


def _make_probe(orig: str) -> Callable:
    def probe(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
              attention_mask: Tensor | None, *args, **kwargs):
        rec = _ACTIVE[-1] if _ACTIVE else None
        if rec is not None:
            with torch.no_grad():
                _record(rec, module, query, key, attention_mask, kwargs.get("scaling"), kwargs)
        return _original_fn(module, orig)(module, query, key, value, attention_mask, *args, **kwargs)

    probe.__name__ = f"{PROBE_PREFIX}{orig}"
    return probe


def _register(orig: str) -> str:
    """Register the probe for original implementation ``orig`` (idempotent); return its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = f"{PROBE_PREFIX}{orig}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_probe(orig))
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        mask_orig = orig if orig in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping else "eager"
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[mask_orig])
    return name


def _configs(model) -> list:
    """Every distinct config object reachable from the model (its own and those held by modules)."""
    seen: dict[int, object] = {}
    root = model if isinstance(model, nn.Module) else getattr(model, "model", model)
    for obj in [model, root]:
        cfg = getattr(obj, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    if isinstance(root, nn.Module):
        for m in root.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                seen.setdefault(id(cfg), cfg)
    return list(seen.values())


@contextmanager
def attention_probe(model, rec: _Recorder) -> Iterator[_Recorder]:
    """Switch every config of ``model`` to the probe for the duration of the block; restore after."""
    cfgs = _configs(model)
    if not cfgs:
        raise ValueError("rain_adapter.merging.attention: the model has no config with an attention implementation")
    saved = [cfg._attn_implementation_internal if hasattr(cfg, "_attn_implementation_internal")
             else cfg._attn_implementation for cfg in cfgs]
    try:
        for cfg, orig in zip(cfgs, saved):
            o = orig or "eager"
            if isinstance(o, str) and o.startswith(PROBE_PREFIX):
                o = o[len(PROBE_PREFIX):]
            if not isinstance(o, str):
                raise ValueError(f"rain_adapter.merging.attention: unsupported attention implementation {o!r}")
            rec.orig = o
            cfg._attn_implementation = _register(o)
        _ACTIVE.append(rec)
        yield rec
    finally:
        if _ACTIVE and _ACTIVE[-1] is rec:
            _ACTIVE.pop()
        for cfg, orig in zip(cfgs, saved):
            cfg._attn_implementation = orig


def _as_index(x, seq_len: int, what: str) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.long).flatten().unique()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= seq_len):
        raise ValueError(f"rain_adapter.merging.attention: {what} positions out of range [0, {seq_len})")
    return t


def make_recorder(pairs: Sequence[AttentionPair], seq_len: int, chunk: int = 256) -> _Recorder:
    """Build the membership matrices for ``pairs`` over a sequence of ``seq_len`` tokens."""
    if not pairs:
        raise ValueError("rain_adapter.merging.attention: no (queries, keys) pairs given")
    qs = [_as_index(p.queries, seq_len, "query") for p in pairs]
    ks = [_as_index(p.keys, seq_len, "key") for p in pairs]
    for i, (q, k) in enumerate(zip(qs, ks)):
        if q.numel() == 0 or k.numel() == 0:
            raise ValueError(f"rain_adapter.merging.attention: pair {i} has an empty query or key set")
    rows = torch.cat(qs).unique()                       # sorted
    row_member = torch.zeros(len(pairs), rows.numel(), dtype=torch.float32)
    key_member = torch.zeros(seq_len, len(pairs), dtype=torch.float32)
    for i, (q, k) in enumerate(zip(qs, ks)):
        row_member[i, torch.searchsorted(rows, q)] = 1.0
        key_member[k, i] = 1.0
    norm = torch.tensor([q.numel() * k.numel() for q, k in zip(qs, ks)], dtype=torch.float32)
    return _Recorder(rows=rows, row_member=row_member, key_member=key_member, norm=norm,
                     seq_len=seq_len, chunk=max(1, int(chunk)), orig="")


def _forward(model, input_ids: Tensor) -> None:
    kw = dict(input_ids=input_ids, use_cache=False)
    try:
        model(**kw, logits_to_keep=1)
    except TypeError:
        model(**kw)


@torch.no_grad()
def attention_pair_stats(model, input_ids: Tensor, pairs: Sequence[AttentionPair], *,
                         chunk: int = 256, n_layers: int | None = None) -> Tensor:
    """Mean attention probability from each pair's queries to its keys, per layer and head.

    ``model``: an HF causal LM (or a ``RainModel`` wrapping one), any attention implementation.
    ``input_ids``: ``[T]`` or ``[1, T]``.  ``pairs``: the (queries, keys) position sets.
    Returns float32 ``[n_pairs, n_layers, n_heads]`` with
    ``s[p, ℓ, h] = Σ_{t∈Q_p} Σ_{τ∈K_p} P^{ℓ,h}[t, τ] / (|Q_p||K_p|)``.
    One forward pass; the model's outputs are unchanged by the probe.
    """
    ids = input_ids if input_ids.ndim == 2 else input_ids[None]
    if ids.shape[0] != 1:
        raise ValueError("rain_adapter.merging.attention: attention_pair_stats takes one sequence (batch 1)")
    rec = make_recorder(pairs, ids.shape[1], chunk)
    with attention_probe(model, rec):
        _forward(model, ids)
    if not rec.results:
        raise RuntimeError("rain_adapter.merging.attention: the probe was never called: the model's attention does not "
                           "dispatch through transformers' AttentionInterface")
    layers = sorted(rec.results)
    L = n_layers if n_layers is not None else layers[-1] + 1
    H = rec.results[layers[0]].shape[1]
    out = torch.full((len(pairs), L, H), float("nan"), dtype=torch.float32)
    for l_idx in layers:
        out[:, l_idx] = rec.results[l_idx].cpu()
    return out
