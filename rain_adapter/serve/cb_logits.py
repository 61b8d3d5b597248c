"""Per-request logits processing and logprobs inside transformers' continuous batching loop.

transformers 5.x's continuous batching (``ContinuousBatchingLogitsProcessorList``) has per-request
*arguments* only for temperature / top-k / top-p; other processors in its list are called as
``processor(input_ids [N], scores [N, V])`` with one row per request that gets a new token this step,
and no request identity. :class:`CBRowProcessor` is such a processor that finds the identity itself:
the rows are the batch's ``requests_in_batch`` (``ContinuousBatchingIOs``) that have ``has_new_token``,
in order (how ``prepare_batch_tensors`` builds ``logits_indices``, and how ``update_batch`` hands out
the sampled tokens). ``logits_indices`` is sliced to the number of requests in the batch, so while a
prompt is prefilled in pieces the step has more rows than new tokens: the rows past the new-token
ones are unused (index 0) and left alone. Any other row count raises instead of guessing — the same
bookkeeping the λ hook (:class:`~rain_adapter.serve.continuous.TokenLambdaHook`) cross-checks. For
each registered request it

* records the raw ``log_softmax`` of its row under (request id, generated length) when it wants
  logprobs (:meth:`take` hands it to the row tracker with the token, then forgets it);
* applies its processing (penalties, ``logit_bias``, bans, ``top_k``, ``min_p``) with its prompt ids and
  ``state.generated_tokens``: the processed rows of a step are stacked and processed at once
  (:func:`~rain_adapter.serve.row_logits.apply_rows`, the math the dynamic path uses; each request
  keeps its own :class:`~rain_adapter.serve.row_logits.RowConsts` with its token counts).

Rows of requests it does not know (plain requests) are left untouched. The manager loop is greedy only
(see :mod:`rain_adapter.serve.continuous`), so min-p uses T = 0 (it keeps the argmax; greedy tokens
are unchanged by it, as vLLM).
"""

from __future__ import annotations

import threading
from typing import Sequence

import torch

from .row_logits import RowConsts, apply_rows, stack_rows
from .sampling import LogitsSpec


class CBRowProcessor:
    """A processor for ``manager.logit_processor`` (:meth:`attach`); :meth:`add` / :meth:`remove` per request."""

    supports_continuous_batching = True  # transformers keeps it in the CB list

    def __init__(self, manager, eos_ids: Sequence[int]):
        self.manager = manager
        self.eos_ids = [int(e) for e in eos_ids]
        self._lock = threading.Lock()
        self._reqs: dict[str, tuple[LogitsSpec | None, list[int], tuple, bool]] = {}
        self._consts: dict[str, RowConsts] = {}   # built on a request's first step (vocabulary, device known)
        self._lps: dict[tuple[str, int], torch.Tensor] = {}
        self.calls = 0

    def attach(self) -> CBRowProcessor:
        lp = self.manager.logit_processor
        lp.logits_processor.append(self)
        lp.do_processing = True
        return self

    def add(self, rid: str, spec: LogitsSpec | None, prompt_ids: Sequence[int], bad_ids: tuple, record: bool) -> None:
        """Register request ``rid`` (before it is added to the manager)."""
        with self._lock:
            self._reqs[rid] = (spec if spec is not None and spec.logits_active else None,
                               list(prompt_ids), tuple(bad_ids), bool(record))

    def remove(self, rid: str) -> None:
        with self._lock:
            self._reqs.pop(rid, None)
            self._consts.pop(rid, None)
            for key in [k for k in self._lps if k[0] == rid]:
                del self._lps[key]

    def take(self, rid: str, position: int) -> torch.Tensor | None:
        """The log-softmax ``[V]`` recorded for generated token ``position`` of ``rid`` (once)."""
        with self._lock:
            return self._lps.pop((rid, position), None)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        with self._lock:
            if not self._reqs:
                return scores
            reqs = dict(self._reqs)
        io = self.manager.batch_processor.inputs_and_outputs
        batch = list(io.requests_in_batch)
        rows = [fs.state for fs in batch if fs.has_new_token]
        if scores.shape[0] not in (len(rows), len(batch)):
            raise RuntimeError(f"rain_adapter.serve.cb_logits: {scores.shape[0]} logits rows for {len(batch)} requests "
                               f"({len(rows)} with a new token); refusing to guess whose logits are whose")
        self.calls += 1
        idx, consts, gens = [], [], []
        for i, state in enumerate(rows):
            got = reqs.get(state.request_id)
            if got is None:
                continue
            spec, prompt, bad, record = got
            gen = list(state.generated_tokens)
            if record:
                lp = torch.log_softmax(scores[i].float(), dim=-1).cpu()
                with self._lock:
                    self._lps[(state.request_id, len(gen))] = lp
            if spec is None:
                continue
            with self._lock:
                c = self._consts.get(state.request_id)
            if c is None:
                c = RowConsts(spec, prompt, bad, self.eos_ids, scores.shape[1], scores.device, scores.dtype)
                with self._lock:
                    if state.request_id in self._reqs:  # not removed meanwhile
                        self._consts[state.request_id] = c
            c.feed(gen)
            idx.append(i)
            consts.append(c)
            gens.append(gen)
        if not idx:
            return scores
        t = stack_rows(consts, scores.device, scores.dtype)
        bad_now = [c.bad_ban(g) if c.bad else [] for c, g in zip(consts, gens)]
        out = scores.clone()
        at = torch.tensor(idx, device=scores.device)
        out[at] = apply_rows(scores[at], t, [len(g) for g in gens], bad_now if any(bad_now) else None)
        return out


__all__ = ["CBRowProcessor"]
