"""Dynamic batching of generation requests with one λ per batch row.

Requests that arrive within ``batch_window_ms`` of the first waiting one (up to
``max_batch_size``) and whose sampling parameters are compatible are run as ONE
``generate`` call: prompts are left-padded to ``[B, T]``, the adapter gets a
``[B]`` tensor of per-row λ through ``RainModel.set_lambda``, and a per-row
tracker (a ``StoppingCriteria``) turns the newest token of every row into
incremental text, applies each row's own ``max_tokens`` and ``stop`` strings,
and finishes rows independently.

Batching mode: *dynamic batching per generate call* (the default; a request that
arrives while a batch is decoding waits for the next call).  ``rain serve
--batching continuous`` uses transformers' continuous batching with a per-token λ
instead (:mod:`rain_adapter.serve.continuous`); sampling requests still come here.

Compatibility (who may share a call): all greedy requests; sampling requests
with equal ``(temperature, top_p)`` and no seed.  A request with a ``seed`` runs
alone so that its output does not depend on its neighbours.  Logits processing
(penalties, ``logit_bias``, ``top_k``, ``min_p``, ``min_tokens``, ``ignore_eos``,
``allowed_token_ids``, ``bad_words``) and logprobs are per row
(:class:`~rain_adapter.serve.row_logits.BatchLogitsProcessor`) and do not split a
batch; echo's prompt logprobs come from one left-padded forward of the batch's echo rows.

Threading: one worker thread owns the model.  The asyncio side submits a
:class:`GenJob` and reads :class:`GenEvent` s from ``job.events`` (an
``asyncio.Queue`` filled through ``loop.call_soon_threadsafe``); the job types and
the :class:`~rain_adapter.serve.scheduler.Scheduler` protocol this class implements
live in :mod:`rain_adapter.serve.scheduler`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Sequence

import torch

from .logprobs import batch_prompt_logprobs, entry
from .row_logits import BatchLogitsProcessor
from .sampling import bad_words_ids
from .scheduler import GenEvent, GenJob, GenParams, JobRejected, SchedulerHealth

log = logging.getLogger("rain_adapter.serve")


class _RowState:
    """Incremental detokenisation and stop handling of one batch row."""

    def __init__(self, job: GenJob, tokenizer, skip_ids: set[int], eos_ids: set[int]):
        self.job = job
        self.tok = tokenizer
        self.skip_ids = skip_ids if job.params.skip_ids is None else job.params.skip_ids
        self.eos_ids = eos_ids
        self.ids: list[int] = []
        self.text = ""          # decoded text of self.ids (without skipped ids), up to a stop string
        self.emitted = 0        # characters of self.text already sent
        self.finished = False
        self.finish_reason: str | None = None
        self.holdback = max((len(s) for s in job.params.stop), default=1) - 1
        # logprob_of(position) -> the [V] log-softmax the token at that position was chosen from (logprobs)
        self.logprob_of: Callable[[int], torch.Tensor | None] | None = None
        spec = job.params.processing
        self.stop_ids = set(getattr(spec, "stop_token_ids", ()) or ())

    def feed(self, token: int, now: float) -> None:
        """One generated token: record it, then end the row at EOS / a stop token id / a stop string /
        ``max_tokens``, else send the text that is safe to send.

        EOS and a ``stop_token_ids`` id count as generated tokens (``completion_tokens``, logprobs) but
        add no text, as vLLM; a stop id's ``stop_reason`` is the id."""
        if self.finished:
            return
        job = self.job
        if job.cancelled:
            self._finish("cancelled")
            return
        if job.t_first_token is None:
            job.t_first_token = now
        self.ids.append(token)
        job.n_generated = len(self.ids)
        lp = self.logprob_of(len(self.ids) - 1) if self.logprob_of is not None else None
        if lp is not None:
            job.token_logprobs.append(entry(lp, token, job.params.logprobs or 0))
        if token in self.eos_ids:
            self._finish("stop")
            return
        if token in self.stop_ids:
            self._finish("stop", stop_reason=token)
            return
        if token not in self.skip_ids:
            text = self.tok.decode([t for t in self.ids if t not in self.skip_ids],
                                   skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self.text = text
        for s in job.params.stop:
            pos = self.text.find(s, max(0, self.emitted - len(s)))
            if pos >= 0:
                self.text = self.text[:pos + (len(s) if job.params.include_stop_str else 0)]
                self._finish("stop", stop_reason=s)
                return
        if len(self.ids) >= job.params.max_tokens:
            self._finish("length")
            return
        self._emit_ready(final=False)

    def _emit_ready(self, final: bool) -> None:
        text = self.text
        end = len(text) if final else len(text) - self.holdback
        if not final:
            while end > self.emitted and text[end - 1] == "\ufffd":  # incomplete UTF-8 sequence
                end -= 1
        if end > self.emitted:
            self.job.emit(GenEvent("delta", text=text[self.emitted:end]))
            self.emitted = end

    def _finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.finished = True
        self.finish_reason = reason
        self._emit_ready(final=True)
        self.job.emit(GenEvent("done", finish_reason=reason, stop_reason=stop_reason,
                               completion_tokens=len(self.ids), t=time.perf_counter()))


class _RowTracker:
    """A ``StoppingCriteria``: feeds every row's newest token to its :class:`_RowState`.

    Returns ``is_done [B]`` (bool) so rows finish independently; generate stops when all are done.
    """

    def __init__(self, rows: Sequence[_RowState]):
        self.rows = list(rows)

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        now = time.perf_counter()
        for row, tok in zip(self.rows, last):
            row.feed(int(tok), now)
        return torch.tensor([r.finished for r in self.rows], dtype=torch.bool, device=input_ids.device)


class BatchScheduler:
    """Groups compatible jobs into one left-padded ``generate`` call with per-row λ.

    Implements :class:`~rain_adapter.serve.scheduler.Scheduler`; the worker thread runs from
    :meth:`start` to :meth:`stop`.
    ``model``: a ``RainModel`` (``set_lambda`` of a ``[B]`` tensor) or a bare HF model (λ ignored).
    ``on_batch(size, seconds)`` is called after each generate call (metrics).
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, batch_window_ms: float = 10.0,
                 on_batch: Callable[[int, float], None] | None = None):
        if max_batch_size < 1:
            raise ValueError("rain_adapter.serve.batching: max_batch_size must be >= 1")
        self.model = model
        self.tok = tokenizer
        self.max_batch_size = int(max_batch_size)
        self.window = max(0.0, float(batch_window_ms)) / 1000.0
        self.on_batch = on_batch
        self._queue: collections.deque[GenJob] = collections.deque()
        self._cond = threading.Condition()
        self._started = False
        self._stopping = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="rain-batcher", daemon=True)
        self.pad_id, self.eos_ids, self.skip_ids = self._special_ids()
        self.device = getattr(model, "device", torch.device("cpu"))

    # ------------------------------------------------------------------ public (the Scheduler protocol)
    def start(self) -> BatchScheduler:
        """Start the worker thread (idempotent)."""
        with self._cond:
            if not self._started:
                self._started = True
                self._thread.start()
        return self

    def submit(self, job: GenJob) -> None:
        if not job.prompt_ids:
            raise JobRejected("rain_adapter.serve.batching: a request needs at least one prompt token")
        with self._cond:
            if self._stopping:
                raise RuntimeError("rain_adapter.serve.batching: the scheduler is shutting down")
            self._queue.append(job)
            self._cond.notify_all()

    def cancel(self, job: GenJob) -> None:
        """Mark ``job`` cancelled: a queued job is dropped when taken, a running row ends at its next token."""
        job.cancelled = True

    def queue_depth(self) -> int:
        return len(self._queue)

    def busy(self) -> bool:
        return self._busy

    def health(self) -> SchedulerHealth:
        alive = not self._started or self._thread.is_alive() or self._stopping
        return SchedulerHealth(queue_depth=self.queue_depth(), busy=self.busy(),
                               accepting=self._started and not self._stopping, healthy=alive,
                               reason=None if alive else "the batching worker thread died")

    def stop(self, timeout: float | None = 60.0) -> None:
        """Finish every queued and running job, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._started:
            self._thread.join(timeout)

    # ---------------------------------------------------------------- internals
    def _special_ids(self) -> tuple[int, set[int], set[int]]:
        tok = self.tok
        gen_cfg = getattr(self.model, "generation_config", None)
        eos: set[int] = set()
        for src in (getattr(gen_cfg, "eos_token_id", None), tok.eos_token_id):
            if src is None:
                continue
            eos.update(src if isinstance(src, (list, tuple)) else [src])
        pad = tok.pad_token_id
        if pad is None:
            pad = getattr(gen_cfg, "pad_token_id", None)
        if pad is None:
            pad = min(eos) if eos else 0
        skip = {i for i in (pad, tok.bos_token_id) if i is not None} | eos
        return int(pad), {int(e) for e in eos}, {int(s) for s in skip}

    def _take_batch(self) -> list[GenJob] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
            first = self._queue.popleft()
            self._busy = True
        key = first.params.compat_key(first.job_id)
        batch = [first]
        deadline = time.monotonic() + self.window
        with self._cond:
            while len(batch) < self.max_batch_size:
                for j in list(self._queue):
                    if len(batch) >= self.max_batch_size:
                        break
                    if j.params.compat_key(j.job_id) == key:
                        self._queue.remove(j)
                        batch.append(j)
                remaining = deadline - time.monotonic()
                if len(batch) >= self.max_batch_size or remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [j for j in batch if not j.cancelled]
            for j in batch:
                if j.cancelled:
                    j.emit(GenEvent("done", finish_reason="cancelled", t=time.perf_counter()))
            try:
                if live:
                    t0 = time.perf_counter()
                    self._generate(live)
                    if self.on_batch is not None:
                        self.on_batch(len(live), time.perf_counter() - t0)
            except BaseException as exc:  # noqa: BLE001 - reported to every waiting request
                log.exception("rain serve: generate failed for a batch of %d", len(live))
                for j in live:
                    j.emit(GenEvent("error", error=exc, t=time.perf_counter()))
            finally:
                self._busy = False

    def _processing(self, jobs: list[GenJob], rows: list[_RowState], input_ids: torch.Tensor,
                    kw: dict[str, Any]) -> None:
        """The batch's per-row logits processor (and the prompts' logprobs for echo), when any row needs one."""
        from transformers import LogitsProcessorList

        echo = [j for j in jobs if j.params.prompt_logprobs]
        if echo:
            ks = [max(j.params.logprobs or 0, j.params.prompt_top) for j in echo]
            for j, (entries, ranks) in zip(echo, batch_prompt_logprobs(self.model, [j.prompt_ids for j in echo],
                                                                        [j.lam for j in echo], ks, self.pad_id,
                                                                        self.device)):
                j.prompt_logprobs, j.prompt_ranks = entries, ranks
        if all(j.params.plain for j in jobs):
            return
        record = any(j.params.logprobs is not None for j in jobs)
        specs = [j.params.processing for j in jobs]
        bad = [bad_words_ids(self.tok, s.bad_words) if s is not None and s.bad_words else () for s in specs]
        p = jobs[0].params
        proc = BatchLogitsProcessor(specs, input_ids, [len(j.prompt_ids) for j in jobs], sorted(self.eos_ids),
                                    record, 0.0 if p.greedy else float(p.temperature), bad)
        for i, (j, r) in enumerate(zip(jobs, rows)):
            if j.params.logprobs is not None:
                r.logprob_of = (lambda i: lambda _pos: proc.last[i] if proc.last is not None else None)(i)
        kw.update(logits_processor=LogitsProcessorList([proc]), repetition_penalty=None, top_k=None)

    @torch.inference_mode()
    def _generate(self, jobs: list[GenJob]) -> None:
        """Left-pad prompts to ``[B, T]``, set per-row λ ``[B]``, run one generate call."""
        B = len(jobs)
        T = max(len(j.prompt_ids) for j in jobs)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        for i, j in enumerate(jobs):
            n = len(j.prompt_ids)
            input_ids[i, T - n:] = torch.tensor(j.prompt_ids, dtype=torch.long)
            attn[i, T - n:] = 1
            j.batch_size = B
        rows = [_RowState(j, self.tok, self.skip_ids, self.eos_ids) for j in jobs]
        tracker = _RowTracker(rows)
        p = jobs[0].params
        kw: dict[str, Any] = dict(
            max_new_tokens=max(j.params.max_tokens for j in jobs),
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) if self.eos_ids else None,
            stopping_criteria=[tracker],
        )
        if p.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=float(p.temperature), top_p=float(p.top_p), top_k=None)
            if p.seed is not None:
                torch.manual_seed(int(p.seed))
        self._processing(jobs, rows, input_ids, kw)  # per-row processors / logprobs: the batch stays whole
        if hasattr(self.model, "set_lambda"):
            self.model.set_lambda(torch.tensor([j.lam for j in jobs], dtype=torch.float32))
        from transformers import StoppingCriteriaList

        kw["stopping_criteria"] = StoppingCriteriaList([tracker])
        self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attn.to(self.device), **kw)
        now = time.perf_counter()
        for r in rows:  # rows that generate ended without our tracker seeing the end
            if not r.finished:
                r.job.t_first_token = r.job.t_first_token or now
                r._finish("length")


__all__ = ["BatchScheduler", "GenEvent", "GenJob", "GenParams"]
