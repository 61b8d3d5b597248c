"""Continuous batching with a per-token λ (optional scheduler: ``rain serve --batching continuous``).

transformers' continuous batching (``ContinuousBatchingManager``, paged KV cache) packs every
scheduled request into ONE varlen row: each forward gets ``input_ids [1, M]`` and
``cu_seq_lens_q [R + 1]`` (request r owns tokens ``cu[r]:cu[r+1]``), in the order of the batch's
``requests_in_batch`` (``ContinuousBatchingIOs``, the list ``prepare_batch_tensors`` packed). A
forward pre-hook on the wrapped HF model (plain ``nn.Module.register_forward_pre_hook``, kwargs
included) turns that into a per-token λ ``[M]``::

    λ_tok[cu[r]:cu[r+1]] = λ(request r)          padding tokens (cu plateau) get λ = 0

and hands it to ``RainModel.set_token_lambda`` before the decoder runs. The hook cross-checks the
request list against ``cu_seq_lens_q`` (every query length) and raises on any mismatch, so a change
in transformers' internals fails loudly instead of silently mixing λ between requests.

Constraints this module enforces (each would break per-request λ):

* ``allow_block_sharing=False``: prefix caching would reuse KV computed under another request's λ
  (K/V projections carry the adapter).
* no CUDA graphs, no ``torch.compile``, no async double-buffering: graph replays skip Python hooks
  and async batching prepares batch N+1 while N runs.
* greedy decoding only in the manager; sampling requests (and echo requests, which need a prompt
  forward) are served by the dynamic scheduler (``batching.BatchScheduler``, batched there too) while
  the manager is paused (``manager.pause()``). Greedy requests with logits processing (penalties,
  ``logit_bias``, ``top_k``, ``min_p``, ``min_tokens``, ``ignore_eos``, allowed / bad tokens) or
  logprobs stay in the manager: :class:`~rain_adapter.serve.cb_logits.CBRowProcessor` applies each
  request's processing to its own row of the packed step and records its logprobs.

Supervision: a job the loop can never run (an empty prompt, more tokens than the paged cache holds)
is refused at ``submit`` (:class:`~rain_adapter.serve.scheduler.JobRejected`, a 400). An error while
turning one request's tokens into text fails that request alone. If the loop itself dies, the
requests it was running fail with a 500 naming the loop's error, the consumer builds a new manager
and restarts it, and until then :meth:`ContinuousScheduler.health` is unhealthy (``/health`` 503)
and ``submit`` raises :class:`~rain_adapter.serve.scheduler.SchedulerUnavailable` (503).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

import torch

from .batching import BatchScheduler, _RowState
from .cb_logits import CBRowProcessor
from .sampling import bad_words_ids
from .scheduler import GenEvent, GenJob, JobRejected, SchedulerHealth, SchedulerUnavailable

log = logging.getLogger("rain_adapter.serve")

_CHILD = "__child#"


def cb_config(*, max_requests: int = 8, max_batch_tokens: int = 256, num_blocks: int | None = None,
              page_size: int = 32, device: torch.device | str | None = None):
    """A ``ContinuousBatchingConfig`` that is safe for per-token λ (see the module doc).

    ``num_blocks=None`` lets transformers size the paged cache from free accelerator memory; on CPU
    (``device``) it defaults to 64 blocks of ``page_size`` tokens (sizing from host RAM is slow and huge).
    """
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    if num_blocks is None and device is not None and torch.device(device).type == "cpu":
        num_blocks = 64

    return ContinuousBatchingConfig(
        page_size=page_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
        max_requests_per_batch=max_requests, allow_block_sharing=False, use_async_batching=False,
        use_cuda_graph=False, default_compile_level=0, auto_switch_to_flash=False)


def _check_manager(manager) -> None:
    cfg = manager.continuous_batching_config
    bad = []
    if cfg.allow_block_sharing and getattr(manager, "_use_prefix_sharing", True):
        bad.append("allow_block_sharing=True (prefix KV computed under another λ would be reused)")
    if cfg.use_async_batching:
        bad.append("use_async_batching=True")
    if any(cfg.use_cuda_graph if isinstance(cfg.use_cuda_graph, tuple) else [bool(cfg.use_cuda_graph)]):
        bad.append("use_cuda_graph (graph replays skip the λ hook)")
    if cfg.varlen_compile_config is not None or cfg.decode_compile_config is not None:
        bad.append("torch.compile configs")
    if bad:
        raise ValueError("rain_adapter.serve.continuous: per-token λ needs a continuous batching config without "
                         + "; ".join(bad) + " — build it with cb_config()")


class TokenLambdaHook:
    """Forward pre-hook: per-token λ ``[M]`` for each continuous-batching forward of ``rain_model``.

    ``lam_of(request_id) -> float`` gives a request's λ (KeyError for an unknown request).
    Forwards without ``cu_seq_lens_q`` (plain ``generate`` while the manager is paused) are left alone.
    """

    def __init__(self, rain_model, manager, lam_of: Callable[[str], float]) -> None:
        if not hasattr(rain_model, "set_token_lambda"):
            raise TypeError("rain_adapter.serve.continuous: the model needs a RAIN adapter (RainModel)")
        _check_manager(manager)
        self.rain_model = rain_model
        self.manager = manager
        self.lam_of = lam_of
        self.forwards = 0
        self._handle = rain_model.model.register_forward_pre_hook(self, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()

    def _lam(self, request_id: str) -> float:
        base = request_id.split(_CHILD, 1)[0]
        return float(self.lam_of(base))

    def token_lambda(self, kwargs: dict) -> torch.Tensor:
        """The ``[M]`` λ of one packed forward (see the module doc for the mapping)."""
        from transformers.generation.continuous_batching.input_outputs import ContinuousBatchingIOs

        io = self.manager.batch_processor.inputs_and_outputs
        if type(io) is not ContinuousBatchingIOs:
            raise RuntimeError(f"rain_adapter.serve.continuous: unsupported IO class {type(io).__name__} "
                               "(async batching is not supported with per-token λ)")
        reqs = list(io.requests_in_batch)
        m = int(kwargs["input_ids"].shape[-1])
        cu = [int(c) for c in kwargs["cu_seq_lens_q"].tolist()]
        n = len(reqs)
        qlens = [int(fs.query_length) for fs in reqs]
        expect = [0]
        for q in qlens:
            expect.append(expect[-1] + q)
        if cu[: n + 1] != expect or any(c != expect[-1] for c in cu[n + 1:]) or expect[-1] > m:
            raise RuntimeError(
                "rain_adapter.serve.continuous: transformers' batch bookkeeping does not match the forward "
                f"(cu_seq_lens_q={cu}, query lengths of requests_in_batch={qlens}, tokens={m}); refusing to guess λ")
        lam = torch.zeros(m, dtype=torch.float32)
        for r, fs in enumerate(reqs):
            lam[expect[r]:expect[r + 1]] = self._lam(fs.state.request_id)
        return lam

    def __call__(self, module, args, kwargs):
        if kwargs.get("cu_seq_lens_q") is None or "input_ids" not in kwargs:
            return None
        self.rain_model.set_token_lambda(self.token_lambda(kwargs))
        self.forwards += 1
        return None


def _greedy_generation_config(model, max_new_tokens: int, eos_token_id):
    from transformers import GenerationConfig

    eos = eos_token_id if eos_token_id is not None else -1
    pad = getattr(model.generation_config, "pad_token_id", None)
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                            pad_token_id=0 if pad is None else pad)


class _PausedBatchScheduler(BatchScheduler):
    """The dynamic scheduler for sampling requests; each generate call runs with the CB loop paused."""

    def __init__(self, *args, pause: Callable, **kw):
        self._pause = pause
        super().__init__(*args, **kw)

    def _generate(self, jobs: list[GenJob]) -> None:
        with self._pause():
            super()._generate(jobs)


class ContinuousScheduler:
    """The other :class:`~rain_adapter.serve.scheduler.Scheduler` (a drop-in for :class:`BatchScheduler`).

    Greedy jobs go to transformers' continuous batching with a per-token λ (and their own logits
    processing / logprobs through :class:`~rain_adapter.serve.cb_logits.CBRowProcessor`): a request joins
    the running batch at the next step instead of waiting for the current generate call to end. Sampling
    and echo jobs go to a dynamic :class:`BatchScheduler` that runs while the CB loop is paused.
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, batch_window_ms: float = 10.0,
                 on_batch: Callable[[int, float], None] | None = None, max_new_tokens: int = 1024,
                 max_batch_tokens: int = 512, num_blocks: int | None = None, page_size: int = 32):
        if not hasattr(model, "set_token_lambda"):
            raise TypeError("rain_adapter.serve.continuous: --batching continuous needs an adapter (RainModel)")
        self.model = model
        self.tok = tokenizer
        self.on_batch = on_batch
        self._fallback = _PausedBatchScheduler(model, tokenizer, max_batch_size=max_batch_size,
                                               batch_window_ms=batch_window_ms, on_batch=on_batch,
                                               pause=self._pause)
        self.pad_id, self.eos_ids, self.skip_ids = self._fallback.pad_id, self._fallback.eos_ids, self._fallback.skip_ids
        hf = model.model
        # the manager (paged cache, attention switch) and the λ hook are made in start()
        self._manager_args = dict(
            generation_config=_greedy_generation_config(hf, max_new_tokens, sorted(self.eos_ids) or None),
            continuous_batching_config=cb_config(max_requests=max_batch_size, max_batch_tokens=max_batch_tokens,
                                                 num_blocks=num_blocks, page_size=page_size, device=hf.device))
        self.manager = None
        self.hook: TokenLambdaHook | None = None
        self.rows_proc: CBRowProcessor | None = None
        cfg = self._manager_args["continuous_batching_config"]
        self.capacity = (int(cfg.num_blocks) * int(cfg.page_size)) if cfg.num_blocks else None
        self.restarts = 0
        self._healthy, self._reason = True, None
        self._lams: dict[str, float] = {}
        # λ of requests we finished early (stop string / client gone) and cancelled: the CB loop may still
        # schedule them for a step or two before it processes the cancellation, so keep their λ a while
        self._retired: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._retired_cap = max(1024, 16 * max_batch_size)
        self._rows: dict[str, tuple[_RowState, int]] = {}   # request id -> (row, tokens already fed)
        self._lock = threading.Condition()
        self._started = False
        self._stopping = False
        self._thread = threading.Thread(target=self._consume, name="rain-cb-consumer", daemon=True)

    def _lam_of(self, request_id: str) -> float:
        with self._lock:
            lam = self._lams.get(request_id)
            if lam is None:
                lam = self._retired.get(request_id)
        if lam is None:
            raise KeyError(f"rain_adapter.serve.continuous: no λ for request {request_id!r}")
        return lam

    def _pause(self):
        return self.manager.pause()

    # ------------------------------------------------------------------ public (the Scheduler protocol)
    def start(self) -> ContinuousScheduler:
        """Make and start the CB manager with its λ hook, the result consumer and the fallback (idempotent)."""
        with self._lock:
            if self._started:
                return self
            self.manager = self.model.model.init_continuous_batching(**self._manager_args)
            self.hook = TokenLambdaHook(self.model, self.manager, self._lam_of)
            self.rows_proc = CBRowProcessor(self.manager, sorted(self.eos_ids)).attach()
            self._started = True
        self._fallback.start()
        self.manager.start()
        self._thread.start()
        return self

    def submit(self, job: GenJob) -> None:
        if not job.prompt_ids:
            raise JobRejected("rain_adapter.serve.continuous: a request needs at least one prompt token")
        p = job.params
        if not p.greedy or p.prompt_logprobs:
            self._fallback.submit(job)
            return
        need = len(job.prompt_ids) + job.params.max_tokens
        if self.capacity is not None and need > self.capacity:
            raise JobRejected(f"prompt + max_tokens = {need} tokens is over the continuous batching cache "
                              f"({self.capacity} tokens)")
        with self._lock:
            if self._stopping or not self._started:
                raise RuntimeError("rain_adapter.serve.continuous: the scheduler is "
                                   + ("shutting down" if self._stopping else "not started"))
            if not self._healthy:
                raise SchedulerUnavailable(f"rain_adapter.serve.continuous: {self._reason}")
            self._lams[job.job_id] = float(job.lam)
            row = _RowState(job, self.tok, self.skip_ids, self.eos_ids)
            if not p.plain:
                spec = p.processing
                bad = bad_words_ids(self.tok, spec.bad_words) if spec is not None and spec.bad_words else ()
                self.rows_proc.add(job.job_id, spec, job.prompt_ids, bad, p.logprobs is not None)
                if p.logprobs is not None:
                    row.logprob_of = (lambda rid, rp: lambda pos: rp.take(rid, pos))(job.job_id, self.rows_proc)
            self._rows[job.job_id] = (row, 0)
            job.batch_size = len(self._rows)
        rid = self.manager.add_request(list(job.prompt_ids), request_id=job.job_id,
                                       max_new_tokens=job.params.max_tokens, streaming=True,
                                       eos_token_id=sorted(self.eos_ids) or -1)
        if rid is None:
            self._drop(job.job_id)
            raise RuntimeError("rain_adapter.serve.continuous: the continuous batching manager refused the request")

    def cancel(self, job: GenJob) -> None:
        """Mark ``job`` cancelled; its row ends at the next token and the consumer cancels it in the CB loop."""
        job.cancelled = True

    def queue_depth(self) -> int:
        with self._lock:
            waiting = sum(1 for row, _ in self._rows.values() if row.job.t_first_token is None)
        return waiting + self._fallback.queue_depth()

    def busy(self) -> bool:
        return bool(self._rows) or self._fallback.busy()

    def health(self) -> SchedulerHealth:
        fb = self._fallback.health()
        healthy = self._healthy and fb.healthy and (not self._started or self._thread.is_alive())
        reason = self._reason or fb.reason or (None if healthy else "the result consumer thread died")
        return SchedulerHealth(queue_depth=self.queue_depth(), busy=self.busy(),
                               accepting=self._started and not self._stopping, healthy=healthy, reason=reason)

    def stop(self, timeout: float | None = 60.0) -> None:
        """Finish every in-flight job, then stop the CB loop, the consumer and the fallback scheduler."""
        self._fallback.stop(timeout)
        deadline = time.monotonic() + (timeout or 1e9)
        with self._lock:
            self._stopping = True
            if not self._started:
                return
            while self._rows and time.monotonic() < deadline and self.manager.is_running():
                self._lock.wait(0.1)
        self.manager.stop(block=True, timeout=timeout)
        self.manager.destroy()
        self.hook.remove()
        self._thread.join(timeout)

    # ---------------------------------------------------------------- internals
    def _drop(self, rid: str, cancelled: bool = False) -> None:
        if self.rows_proc is not None:
            self.rows_proc.remove(rid)
        with self._lock:
            self._rows.pop(rid, None)
            lam = self._lams.pop(rid, None)
            if cancelled and lam is not None:
                self._retired[rid] = lam
                while len(self._retired) > self._retired_cap:
                    self._retired.popitem(last=False)
            self._lock.notify_all()

    def _consume(self) -> None:
        while True:
            out = self.manager.get_result(timeout=0.1)
            if out is None:
                if self._stopping and not self._rows:
                    return
                if not self.manager.is_running():
                    err = self.manager.background_thread_status.fatal_error
                    self._fail_all(RuntimeError(f"the continuous batching loop failed ({err!r}); it was restarted"))
                    if self._stopping:
                        return
                    self._restart(err)
                continue
            with self._lock:
                entry = self._rows.get(out.request_id)
            if entry is None:  # finished on our side (stop string / cancel) or unknown
                continue
            try:
                self._deliver(out, *entry)
            except Exception as e:  # noqa: BLE001 - this request fails alone; the loop keeps serving
                log.exception("rain serve: request %s failed in the result consumer", out.request_id)
                entry[0].job.emit(GenEvent("error", error=e, t=time.perf_counter()))
                self._cancel_quietly(out.request_id)
                self._drop(out.request_id, cancelled=True)

    def _deliver(self, out, row: _RowState, seen: int) -> None:
        """Feed one result's new tokens to its row; finish and retire it when done."""
        if out.error:
            row.job.emit(GenEvent("error", error=RuntimeError(out.error), t=time.perf_counter()))
            self._drop(out.request_id)
            return
        now = time.perf_counter()
        toks = list(out.generated_tokens)
        for t in toks[seen:]:
            row.feed(int(t), now)
            if row.finished:
                break
        with self._lock:
            if out.request_id in self._rows:
                self._rows[out.request_id] = (row, len(toks))
        if out.is_finished() and not row.finished:
            row._finish("length")
        if row.finished:
            early = not out.is_finished()
            if early:
                self._cancel_quietly(out.request_id)
            if self.on_batch is not None:
                self.on_batch(row.job.batch_size, now - row.job.t_arrival)
            self._drop(out.request_id, cancelled=early)

    def _cancel_quietly(self, rid: str) -> None:
        try:
            self.manager.cancel_request(rid)
        except Exception:  # noqa: BLE001 - a dead loop has nothing to cancel
            log.debug("rain serve: could not cancel %s in the CB loop", rid, exc_info=True)

    def _restart(self, err) -> None:
        """Replace the dead manager (and its λ hook) by a new one; unhealthy until it runs."""
        self._healthy, self._reason = False, f"the continuous batching loop stopped ({err!r}); restarting"
        log.error("rain serve: %s", self._reason)
        try:
            old, old_hook = self.manager, self.hook
            try:
                old.destroy()
            except Exception:  # noqa: BLE001 - the old loop is already dead
                log.debug("rain serve: destroying the dead CB manager failed", exc_info=True)
            old_hook.remove()
            manager = self.model.model.init_continuous_batching(**self._manager_args)
            hook = TokenLambdaHook(self.model, manager, self._lam_of)
            rows_proc = CBRowProcessor(manager, sorted(self.eos_ids)).attach()
            manager.start()
            with self._lock:
                self.manager, self.hook, self.rows_proc = manager, hook, rows_proc
            self.restarts += 1
            self._healthy, self._reason = True, None
            log.warning("rain serve: continuous batching loop restarted (%d restarts)", self.restarts)
        except Exception as e:  # noqa: BLE001 - stay unhealthy; the next pass tries again
            self._reason = f"the continuous batching loop could not be restarted ({e!r})"
            log.exception("rain serve: %s", self._reason)
            time.sleep(1.0)  # back off before the next attempt

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            rows = list(self._rows.items())
        for rid, (row, _) in rows:
            row.job.emit(GenEvent("error", error=exc, t=time.perf_counter()))
            self._drop(rid)


__all__ = ["ContinuousScheduler", "TokenLambdaHook", "cb_config"]
