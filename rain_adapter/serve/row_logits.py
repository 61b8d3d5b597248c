"""Per-row logits processing of a whole batch in one pass (every request batches, issue 22).

:class:`BatchLogitsProcessor` is a transformers ``LogitsProcessor`` for a left-padded ``generate`` call of
``B`` rows (prompt width ``T``; row b's prompt is ``input_ids[b, T - n_b : T]``, its generated ids
``input_ids[b, T:]``). Each row has its own :class:`~rain_adapter.serve.sampling.LogitsSpec` (or None: the
row is left alone), and the steps of :mod:`rain_adapter.serve.sampling`'s module doc run on all rows at
once on ``scores [B, V]``:

* the raw ``log_softmax`` ``[B, V]`` is kept in ``last`` when any row wants logprobs;
* repetition penalty: ``seen [B, V]`` (prompt tokens, scattered once; generated tokens added as they come)
  and per-row ``r [B, 1]`` (1 for rows without one: ``z / 1`` and ``z · 1`` are ``z`` exactly);
* frequency / presence: ``counts [B, V]`` kept up to date with ``scatter_add_`` of each step's new column,
  ``z − f·counts − q·[counts > 0]`` with ``f, q [B, 1]`` (0 for other rows: exact no-ops);
* ``logit_bias``: one dense ``bias [B, V]`` added (0 elsewhere: exact);
* bans: ``allowed [B, V]`` and the EOS / stop-id / bad-word masks filled with −∞;
* top-k: the k-th largest per row from one ``topk`` of the largest k, compared per row;
* min-p: ``z < max(z) + T·ln m`` per row.

Each operation is elementwise per row, so a row's result does not depend on its neighbours: a row in a
batch gets the same processed logits as alone (tests/test_serve_processors.py). Only rows whose spec
asks for a step take part in it (the others are masked out or get the neutral value).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .sampling import LogitsSpec


class BatchLogitsProcessor:
    """``specs[b]``: row b's spec or None; ``prompt_lens[b]``: its real prompt length (≤ ``width``, the
    padded prompt width); ``record``: keep the raw log-softmax in ``last`` ``[B, V]``; ``bad_ids[b]``: the
    token sequences of row b's ``bad_words``; ``temperature``: the call's (0 for greedy), for min-p."""

    def __init__(self, specs: Sequence[LogitsSpec | None], prompt_ids: torch.Tensor, prompt_lens: Sequence[int],
                 eos_ids: Sequence[int], record: bool, temperature: float = 1.0,
                 bad_ids: Sequence[Sequence[Sequence[int]]] | None = None):
        self.specs = [s if s is not None and s.logits_active else None for s in specs]
        self.B = len(specs)
        self.width = int(prompt_ids.shape[1])
        self.prompt_ids = prompt_ids
        self.prompt_lens = list(prompt_lens)
        self.eos_ids = [int(e) for e in eos_ids]
        self.record = record
        self.temperature = max(float(temperature), 0.0)
        self.bad_ids = [list(b) for b in bad_ids] if bad_ids is not None else [[] for _ in specs]
        self.last: torch.Tensor | None = None
        self._ready = False
        self._fed = 0  # generated columns already counted

    def _rows(self, pred) -> list[int]:
        return [b for b, s in enumerate(self.specs) if s is not None and pred(s)]

    def _setup(self, scores: torch.Tensor) -> None:
        """Per-row tensors, built on the first call (when the vocabulary width and device are known)."""
        B, V = scores.shape
        dev, dt = scores.device, scores.dtype
        col = lambda vals: torch.tensor(vals, dtype=dt, device=dev).unsqueeze(1)  # noqa: E731
        sp = [s or LogitsSpec() for s in self.specs]
        self.rep_rows = self._rows(lambda s: s.repetition_penalty != 1.0)
        self.rep = col([s.repetition_penalty for s in sp])
        self.pen_rows = self._rows(lambda s: bool(s.frequency_penalty or s.presence_penalty))
        self.freq, self.pres = col([s.frequency_penalty for s in sp]), col([s.presence_penalty for s in sp])
        self.need_counts = bool(self.rep_rows or self.pen_rows)
        self.counts = torch.zeros((B, V), dtype=dt, device=dev) if self.need_counts else None
        self.seen = None
        if self.rep_rows:
            self.seen = torch.zeros((B, V), dtype=torch.bool, device=dev)
            for b in self.rep_rows:
                p = self.prompt_ids[b, self.width - self.prompt_lens[b]:].to(dev).long()
                self.seen[b, p[(p >= 0) & (p < V)]] = True
        self.bias = None
        if self._rows(lambda s: bool(s.logit_bias)):
            self.bias = torch.zeros((B, V), dtype=dt, device=dev)
            for b, s in enumerate(sp):
                for tid, v in s.logit_bias:
                    self.bias[b, tid] += v
        self.allowed = None
        if self._rows(lambda s: bool(s.allowed_token_ids)):
            self.allowed = torch.ones((B, V), dtype=torch.bool, device=dev)
            for b, s in enumerate(sp):
                if s.allowed_token_ids:
                    self.allowed[b] = False
                    self.allowed[b, list(s.allowed_token_ids)] = True
        eos = [e for e in self.eos_ids if 0 <= e < V]
        self.always_ban = torch.zeros((B, V), dtype=torch.bool, device=dev)
        for b in self._rows(lambda s: s.ignore_eos):
            self.always_ban[b, eos] = True
        self.min_rows = self._rows(lambda s: s.min_tokens > 0)
        self.min_ban = torch.zeros((B, V), dtype=torch.bool, device=dev)
        for b in self.min_rows:
            self.min_ban[b, eos + [t for t in sp[b].stop_token_ids if t < V]] = True
        self.min_tokens = torch.tensor([s.min_tokens for s in sp], device=dev)
        self.bad_rows = [b for b in range(B) if self.specs[b] is not None and self.bad_ids[b]]
        self.k_rows = self._rows(lambda s: 0 < s.top_k < V)
        self.topk = torch.tensor([s.top_k if 0 < s.top_k < V else V for s in sp], device=dev)
        self.minp_rows = self._rows(lambda s: s.min_p > 0)
        self.minp = col([self.temperature * math.log(s.min_p) if s.min_p > 0 else -math.inf for s in sp])
        self._ready = True

    def _count(self, input_ids: torch.Tensor) -> None:
        """Add the generated columns not yet counted to ``counts`` (and ``seen``)."""
        n = input_ids.shape[1] - self.width
        if n > self._fed:
            new = input_ids[:, self.width + self._fed: self.width + n].long()
            self.counts.scatter_add_(1, new, torch.ones_like(new, dtype=self.counts.dtype))
            if self.seen is not None:
                self.seen.scatter_(1, new, True)
            self._fed = n

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.record:
            self.last = torch.log_softmax(scores.float(), dim=-1)
        if all(s is None for s in self.specs):
            return scores
        if not self._ready:
            self._setup(scores)
        z = scores.clone()
        ninf = float("-inf")
        n_gen = input_ids.shape[1] - self.width
        if self.need_counts:
            self._count(input_ids)
        if self.rep_rows:
            z = torch.where(self.seen, torch.where(z > 0, z / self.rep, z * self.rep), z)
        if self.pen_rows and n_gen:
            z = z - self.freq * self.counts - self.pres * (self.counts > 0).to(z.dtype)
        if self.bias is not None:
            z = z + self.bias
        if self.allowed is not None:
            z = z.masked_fill(~self.allowed, ninf)
        ban = self.always_ban
        if self.min_rows:
            ban = ban | (self.min_ban & (n_gen < self.min_tokens).unsqueeze(1))
        if self.bad_rows:
            ban = ban.clone()
            for b in self.bad_rows:
                gen = input_ids[b, self.width:].tolist()
                for w in self.bad_ids[b]:
                    if len(w) == 1 or (len(w) - 1 <= len(gen) and gen[len(gen) - len(w) + 1:] == list(w[:-1])):
                        ban[b, w[-1]] = True
        z = z.masked_fill(ban, ninf)
        if self.k_rows:
            kmax = int(self.topk[self.k_rows].max())
            vals = torch.topk(z, kmax, dim=-1).values                           # [B, kmax]
            kth = vals.gather(1, (self.topk.clamp(max=kmax) - 1).unsqueeze(1))  # [B, 1]
            keep_all = (self.topk >= z.shape[1]).unsqueeze(1)
            z = torch.where((z < kth) & ~keep_all, torch.full_like(z, ninf), z)
        if self.minp_rows:
            floor = z.max(dim=-1, keepdim=True).values + self.minp
            z = torch.where(z < floor, torch.full_like(z, ninf), z)
        return z


__all__ = ["BatchLogitsProcessor"]
