"""Per-row logits processing of a whole batch in one pass (every request batches, issue 22).

The steps of :mod:`rain_adapter.serve.sampling`'s module doc, on ``scores [R, V]`` for R rows at once,
each row with its own :class:`~rain_adapter.serve.sampling.LogitsSpec`:

* repetition penalty: ``seen [R, V]`` (prompt tokens, then generated ones as they come) and per-row
  ``r [R, 1]`` (1 for rows without one: ``z / 1`` and ``z · 1`` are ``z`` exactly);
* frequency / presence: generated-token ``counts [R, V]`` (kept with ``scatter_add_`` / one add per new
  token), ``z − f·counts − q·[counts > 0]`` with ``f, q [R, 1]`` (0 for other rows: exact no-ops);
* ``logit_bias``: one dense ``bias [R, V]`` added (0 elsewhere: exact);
* bans: ``allowed [R, V]``, the always-banned (``ignore_eos``), the ``min_tokens`` (EOS + stop ids while
  ``n_gen < min_tokens``) and the bad-word masks, filled with −∞;
* top-k: the k-th largest per row from one ``topk`` of the largest k, compared per row;
* min-p: ``z < max(z) + T·ln m`` per row.

Each operation is elementwise per row, so a row's result does not depend on its neighbours: a row in a
batch gets the same processed logits as alone (tests/test_serve_processors.py). A tensor is only built
when some row needs that step.

:class:`RowConsts` holds one request's tensors (``[V]`` rows); :func:`stack_rows` stacks R of them into
:class:`RowTensors`; :func:`apply_rows` is the math. :class:`BatchLogitsProcessor` is the transformers
``LogitsProcessor`` of a left-padded ``generate`` call (stacks once, then keeps ``counts`` / ``seen``
up to date in place); :class:`~rain_adapter.serve.cb_logits.CBRowProcessor` stacks the rows of each
continuous-batching step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .sampling import LogitsSpec


class RowConsts:
    """One request's processing as ``[V]`` tensors on ``device`` (``dtype`` for values), with its
    generated-token ``counts`` / ``seen`` updated by :meth:`feed`. ``spec`` None: a neutral row."""

    def __init__(self, spec: LogitsSpec | None, prompt: Sequence[int], bad_ids: Sequence[Sequence[int]],
                 eos_ids: Sequence[int], vocab: int, device, dtype, temperature: float = 0.0):
        s = spec if spec is not None and spec.logits_active else LogitsSpec()
        self.active = spec is not None and spec.logits_active
        self.spec, self.V, self.fed = s, vocab, 0
        V, dev = vocab, device
        self.bad = [list(w) for w in bad_ids] if self.active else []
        self.seen = None
        if s.repetition_penalty != 1.0:
            self.seen = torch.zeros(V, dtype=torch.bool, device=dev)
            p = torch.as_tensor(list(prompt), dtype=torch.long)
            self.seen[p[(p >= 0) & (p < V)].to(dev)] = True
        self.counts = torch.zeros(V, dtype=dtype, device=dev) \
            if (s.repetition_penalty != 1.0 or s.frequency_penalty or s.presence_penalty) else None
        self.bias = None
        if s.logit_bias:
            self.bias = torch.zeros(V, dtype=dtype, device=dev)
            for tid, v in s.logit_bias:
                self.bias[tid] += v
        self.allowed = None
        if s.allowed_token_ids:
            self.allowed = torch.zeros(V, dtype=torch.bool, device=dev)
            self.allowed[list(s.allowed_token_ids)] = True
        eos = [int(e) for e in eos_ids if 0 <= int(e) < V]
        self.ban = None
        if s.ignore_eos and eos:
            self.ban = torch.zeros(V, dtype=torch.bool, device=dev)
            self.ban[eos] = True
        self.min_ban = None
        if s.min_tokens > 0:
            self.min_ban = torch.zeros(V, dtype=torch.bool, device=dev)
            self.min_ban[eos + [t for t in s.stop_token_ids if t < V]] = True
        self.top_k = s.top_k if 0 < s.top_k < V else V
        self.minp = max(float(temperature), 0.0) * math.log(s.min_p) if s.min_p > 0 else -math.inf

    def feed(self, generated: Sequence[int]) -> None:
        """Count the generated tokens not yet counted (``generated``: all of this row's so far)."""
        if self.counts is None or len(generated) <= self.fed:
            self.fed = max(self.fed, len(generated))
            return
        new = torch.as_tensor(list(generated[self.fed:]), dtype=torch.long, device=self.counts.device)
        self.counts.index_add_(0, new, torch.ones_like(new, dtype=self.counts.dtype))
        if self.seen is not None:
            self.seen[new] = True
        self.fed = len(generated)

    def bad_ban(self, generated: Sequence[int]) -> list[int]:
        """The bad-word last tokens banned after ``generated``."""
        gen = list(generated)
        return [w[-1] for w in self.bad
                if len(w) == 1 or (len(w) - 1 <= len(gen) and gen[len(gen) - len(w) + 1:] == w[:-1])]


@dataclass
class RowTensors:
    """R rows stacked (None: no row needs that step). Shapes: ``[R, 1]`` columns, ``[R, V]`` masks /
    values, ``[R]`` integers."""

    rep: torch.Tensor | None
    seen: torch.Tensor | None
    freq: torch.Tensor | None
    pres: torch.Tensor | None
    counts: torch.Tensor | None
    bias: torch.Tensor | None
    allowed: torch.Tensor | None
    ban: torch.Tensor | None
    min_ban: torch.Tensor | None
    min_tokens: torch.Tensor | None
    top_k: torch.Tensor | None
    minp: torch.Tensor | None


def stack_rows(rows: Sequence[RowConsts], device, dtype) -> RowTensors:
    """Stack the rows' tensors (a neutral value where a row has none) for the steps any row needs."""
    V = rows[0].V

    def stack(name: str, fill) -> torch.Tensor | None:
        vals = [getattr(r, name) for r in rows]
        if all(v is None for v in vals):
            return None
        dt = torch.bool if isinstance(fill, bool) else dtype
        neutral = torch.full((V,), fill, dtype=dt, device=device)
        return torch.stack([neutral if v is None else v for v in vals])

    def col(vals) -> torch.Tensor:
        return torch.tensor(vals, dtype=dtype, device=device).unsqueeze(1)

    sp = [r.spec for r in rows]
    rep = any(s.repetition_penalty != 1.0 for s in sp)
    pen = any(s.frequency_penalty or s.presence_penalty for s in sp)
    mins = any(s.min_tokens > 0 for s in sp)
    return RowTensors(
        rep=col([s.repetition_penalty for s in sp]) if rep else None,
        seen=stack("seen", False) if rep else None,
        freq=col([s.frequency_penalty for s in sp]) if pen else None,
        pres=col([s.presence_penalty for s in sp]) if pen else None,
        counts=stack("counts", 0.0) if pen else None,
        bias=stack("bias", 0.0), allowed=stack("allowed", True), ban=stack("ban", False),
        min_ban=stack("min_ban", False) if mins else None,
        min_tokens=torch.tensor([s.min_tokens for s in sp], device=device) if mins else None,
        top_k=torch.tensor([r.top_k for r in rows], device=device) if any(r.top_k < V for r in rows) else None,
        minp=col([r.minp for r in rows]) if any(r.minp > -math.inf for r in rows) else None)


def apply_rows(scores: torch.Tensor, t: RowTensors, n_gen, bad: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """The processed logits ``[R, V]`` (a new tensor). ``n_gen``: tokens generated so far, an int or ``[R]``;
    ``bad[r]``: token ids banned in row r this step (bad words)."""
    z, ninf = scores.clone(), float("-inf")
    if t.rep is not None:
        z = torch.where(t.seen, torch.where(z > 0, z / t.rep, z * t.rep), z)
    if t.freq is not None:
        z = z - t.freq * t.counts - t.pres * (t.counts > 0).to(z.dtype)
    if t.bias is not None:
        z = z + t.bias
    if t.allowed is not None:
        z = z.masked_fill(~t.allowed, ninf)
    if t.ban is not None:
        z = z.masked_fill(t.ban, ninf)
    if t.min_ban is not None:
        n = torch.as_tensor(n_gen, device=z.device)
        z = z.masked_fill(t.min_ban & (n < t.min_tokens).unsqueeze(-1), ninf)
    if bad:
        for r, ids in enumerate(bad):
            if ids:
                z[r, ids] = ninf
    if t.top_k is not None:
        kmax = int(t.top_k[t.top_k < z.shape[1]].max())
        vals = torch.topk(z, kmax, dim=-1).values                            # [R, kmax]
        kth = vals.gather(1, (t.top_k.clamp(max=kmax) - 1).unsqueeze(1))      # [R, 1]
        z = torch.where((z < kth) & (t.top_k < z.shape[1]).unsqueeze(1), torch.full_like(z, ninf), z)
    if t.minp is not None:
        floor = z.max(dim=-1, keepdim=True).values + t.minp
        z = torch.where(z < floor, torch.full_like(z, ninf), z)
    return z


class BatchLogitsProcessor:
    """The ``LogitsProcessor`` of one left-padded ``generate`` call of B rows (prompt width ``T``; row b's
    prompt is ``prompt_ids[b, T - prompt_lens[b]:]``, its generated ids ``input_ids[b, T:]``).

    ``specs[b]``: row b's spec or None; ``record``: keep the raw log-softmax ``[B, V]`` of each step in
    ``last``; ``bad_ids[b]``: the token sequences of row b's ``bad_words``; ``temperature``: the call's
    (0 for greedy), for min-p."""

    def __init__(self, specs: Sequence[LogitsSpec | None], prompt_ids: torch.Tensor, prompt_lens: Sequence[int],
                 eos_ids: Sequence[int], record: bool, temperature: float = 1.0,
                 bad_ids: Sequence[Sequence[Sequence[int]]] | None = None):
        self.specs = [s if s is not None and s.logits_active else None for s in specs]
        self.width = int(prompt_ids.shape[1])
        self.prompt_ids, self.prompt_lens = prompt_ids, list(prompt_lens)
        self.eos_ids = [int(e) for e in eos_ids]
        self.record = record
        self.temperature = max(float(temperature), 0.0)
        self.bad_ids = [list(b) for b in bad_ids] if bad_ids is not None else [[] for _ in specs]
        self.last: torch.Tensor | None = None
        self.rows: list[RowConsts] | None = None
        self.t: RowTensors | None = None
        self._fed = 0  # generated columns already counted

    def _setup(self, scores: torch.Tensor) -> None:
        V = scores.shape[1]
        self.rows = [RowConsts(s, self.prompt_ids[b, self.width - self.prompt_lens[b]:].tolist(), self.bad_ids[b],
                               self.eos_ids, V, scores.device, scores.dtype, self.temperature)
                     for b, s in enumerate(self.specs)]
        self.t = stack_rows(self.rows, scores.device, scores.dtype)

    def _count(self, input_ids: torch.Tensor) -> None:
        """Add the generated columns not yet counted to ``counts`` / ``seen`` ``[B, V]``."""
        n = input_ids.shape[1] - self.width
        if n > self._fed:
            new = input_ids[:, self.width + self._fed: self.width + n].long()
            if self.t.counts is not None:
                self.t.counts.scatter_add_(1, new, torch.ones_like(new, dtype=self.t.counts.dtype))
            if self.t.seen is not None:
                self.t.seen.scatter_(1, new, True)
            self._fed = n

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.record:
            self.last = torch.log_softmax(scores.float(), dim=-1)
        if all(s is None for s in self.specs):
            return scores
        if self.t is None:
            self._setup(scores)
        self._count(input_ids)
        bad = None
        if any(r.bad for r in self.rows):
            bad = [r.bad_ban(input_ids[b, self.width:].tolist()) if r.bad else [] for b, r in enumerate(self.rows)]
        return apply_rows(scores, self.t, input_ids.shape[1] - self.width, bad)


__all__ = ["BatchLogitsProcessor", "RowConsts", "RowTensors", "apply_rows", "stack_rows"]
