"""Per-request logits processing and logprobs inside transformers' continuous batching loop.

transformers 5.x's continuous batching (``ContinuousBatchingLogitsProcessorList``) has per-request
*arguments* only for temperature / top-k / top-p; other processors in its list are called as
``processor(input_ids [N], scores [N, V])`` with one row per request that gets a new token this step,
and no request identity. :class:`CBRowProcessor` is such a processor that finds the identity itself:
the rows are the batch's ``requests_in_batch`` (``ContinuousBatchingIOs``) that have ``has_new_token``,
in order (how ``prepare_batch_tensors`` builds ``logits_indices``) — the same bookkeeping the λ hook
(:class:`~rain_adapter.serve.continuous.TokenLambdaHook`) cross-checks, and a mismatch raises instead
of guessing. For each registered request it

* records the raw ``log_softmax`` of its row under (request id, generated length) when it wants
  logprobs (:meth:`take` hands it to the row tracker with the token, then forgets it);
* applies :func:`~rain_adapter.serve.sampling.process_row` (the definition: penalties, ``logit_bias``,
  bans, ``top_k``, ``min_p``) with its prompt ids and ``state.generated_tokens``.

Rows of requests it does not know (plain requests) are left untouched. The manager loop is greedy only
(see :mod:`rain_adapter.serve.continuous`), so min-p uses T = 0 (it keeps the argmax; greedy tokens
are unchanged by it, as vLLM).
"""

from __future__ import annotations

import threading
from typing import Sequence

import torch

from .sampling import LogitsSpec, process_row


class CBRowProcessor:
    """A processor for ``manager.logit_processor`` (:meth:`attach`); :meth:`add` / :meth:`remove` per request."""

    supports_continuous_batching = True  # transformers keeps it in the CB list

    def __init__(self, manager, eos_ids: Sequence[int]):
        self.manager = manager
        self.eos_ids = [int(e) for e in eos_ids]
        self._lock = threading.Lock()
        self._reqs: dict[str, tuple[LogitsSpec | None, torch.Tensor, tuple, bool]] = {}
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
                               torch.tensor(list(prompt_ids), dtype=torch.long), tuple(bad_ids), bool(record))

    def remove(self, rid: str) -> None:
        with self._lock:
            self._reqs.pop(rid, None)
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
        rows = [fs.state for fs in io.requests_in_batch if fs.has_new_token]
        if len(rows) != scores.shape[0]:
            raise RuntimeError(f"rain_adapter.serve.cb_logits: {scores.shape[0]} logits rows but {len(rows)} requests "
                               "with a new token in the batch; refusing to guess whose logits are whose")
        self.calls += 1
        out = None
        for i, state in enumerate(rows):
            got = reqs.get(state.request_id)
            if got is None:
                continue
            spec, prompt, bad, record = got
            gen = torch.tensor(list(state.generated_tokens), dtype=torch.long)
            if record:
                lp = torch.log_softmax(scores[i].float(), dim=-1).cpu()
                with self._lock:
                    self._lps[(state.request_id, gen.numel())] = lp
            if spec is not None:
                if out is None:
                    out = scores.clone()
                out[i] = process_row(scores[i], prompt, gen, spec, self.eos_ids, 0.0, bad)
        return scores if out is None else out


__all__ = ["CBRowProcessor"]
