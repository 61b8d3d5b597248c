"""The vLLM engine behind the :class:`~rain_adapter.serve.scheduler.Scheduler` protocol (``rain serve --engine vllm``).

Generation runs in vLLM's async engine (``vllm.v1.engine.async_llm.AsyncLLM``) in this process
(vLLM runs its engine core in a child process of its own); everything above the scheduler — routes,
request validation, arms, the request log, feedback, checks, the report — is the built-in engine's,
unchanged. vLLM is imported only when this scheduler is built.

λ: every served λ ≠ 0 is one LoRA module (:mod:`~rain_adapter.export.vllm_slots`: the adapter
exported with ``lora_B = λ·B``, so the LoRA adds ``λ (x Aᵀ) Bᵀ``); a job at λ = 0 runs the base
model. A job's λ must be one of the grid's values (the request layer guarantees it:
``--lambda-grid`` makes an off-grid ``rain_lambda`` a 400); the scheduler refuses any other.

Per job: one ``AsyncLLM.generate`` call on the job's prompt token ids with ``n = 1`` (the request
layer already splits ``n`` into jobs) and :func:`sampling_params` of its :class:`GenParams`. vLLM
returns token ids only (``detokenize=False``); the text, the stop strings, ``max_tokens`` and the
EOS ids are handled by the built-in engine's own row tracker (``batching._RowState``), so both
engines turn the same tokens into the same text and the same ``finish_reason`` / ``stop_reason``.
When the row tracker ends a row first (a stop string), the vLLM request is aborted.

Threading: vLLM's engine lives on a private asyncio loop in one thread (``rain-vllm``); ``submit``
and ``cancel`` hand coroutines to it (:func:`asyncio.run_coroutine_threadsafe`), and the job's
events go back to the server's loop through ``GenJob.emit`` as with the built-in schedulers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .batching import _RowState
from .requests import GRID_TOL
from .scheduler import GenEvent, GenJob, GenParams, JobRejected, SchedulerHealth, SchedulerUnavailable

log = logging.getLogger("rain_adapter.serve")


@dataclass(frozen=True)
class VLLMOptions:
    """Engine options passed through to vLLM (``rain serve --engine vllm``'s flags).

    ``kv_cache_space_gib``: the KV cache on the CPU backend (``VLLM_CPU_KVCACHE_SPACE``, GiB; vLLM's
    default when None). ``max_loras``: LoRA slots resident at once (at least the grid's λ ≠ 0
    values; default: their number); ``max_lora_rank``: vLLM's rank bound (the caller's default:
    :func:`~rain_adapter.export.vllm_slots.vllm_lora_rank` of the adapter's rank)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    kv_cache_space_gib: float | None = None
    max_loras: int | None = None
    max_lora_rank: int | None = None
    max_num_seqs: int | None = None
    enforce_eager: bool = False
    seed: int = 0


def sampling_params(p: GenParams, eos_ids: set[int], vocab_size: int):
    """vLLM's ``SamplingParams`` for one job: temperature, top_p, top_k, seed, logprobs (and the
    prompt's for echo), the penalties, logit_bias (ids outside the vocabulary dropped, as the
    built-in engine ignores them), min_tokens; ``ignore_eos`` becomes ``min_tokens = max_tokens``
    (EOS masked at every step: the built-in engine's meaning, never produced, not vLLM's, produced
    but not stopping). Stop strings stay with the row tracker; the EOS ids are the row tracker's."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    spec = p.processing
    kw: dict[str, Any] = dict(n=1, max_tokens=int(p.max_tokens), temperature=max(0.0, float(p.temperature)),
                              top_p=float(p.top_p) if not p.greedy else 1.0, seed=p.seed,
                              stop_token_ids=sorted(eos_ids), detokenize=False,
                              output_kind=RequestOutputKind.DELTA)
    if p.logprobs is not None:
        kw["logprobs"] = int(p.logprobs)
    if p.prompt_logprobs:
        kw["prompt_logprobs"] = int(p.logprobs or 0)
    if spec is not None:
        kw.update(presence_penalty=float(spec.presence_penalty), frequency_penalty=float(spec.frequency_penalty),
                  repetition_penalty=float(spec.repetition_penalty), min_tokens=int(spec.min_tokens))
        if spec.top_k:
            kw["top_k"] = int(spec.top_k)
        bias = {int(t): float(b) for t, b in spec.logit_bias if 0 <= int(t) < vocab_size}
        if bias:
            kw["logit_bias"] = bias
        if spec.ignore_eos:
            kw.update(ignore_eos=True, min_tokens=int(p.max_tokens))
    return SamplingParams(**kw)


def _entry(token: int, lps: dict | None, k: int) -> tuple:
    """vLLM's logprobs of one position (``{id: Logprob}``) as the built-in engine's entry
    ``(id, logprob, [(id, logprob) × k, best first])``."""
    if lps is None:
        return int(token), None, []
    chosen = lps.get(token)
    ranked = sorted(((int(i), float(v.logprob)) for i, v in lps.items() if v.rank is not None and v.rank <= k),
                    key=lambda iv: -iv[1])
    return int(token), (float(chosen.logprob) if chosen is not None else None), ranked[:k]


class VLLMScheduler:
    """A :class:`~rain_adapter.serve.scheduler.Scheduler` that generates with vLLM's ``AsyncLLM``.

    ``model``: the checkpoint vLLM loads; ``tokenizer``: the server's (HF) tokenizer (text, EOS);
    ``slots``: the λ grid's LoRA modules, each with ``lam``, ``name``, ``int_id`` (≥ 1) and ``path``
    (:func:`~rain_adapter.export.vllm_slots.lora_slots`);
    ``grid``: every served λ (0 may be among them: the base model). ``on_batch(size, seconds)`` is
    called as each job ends, with the number of jobs vLLM was running at that moment.
    """

    def __init__(self, model: str, tokenizer, *, grid: tuple[float, ...], slots: list, max_rank: int,
                 options: VLLMOptions = VLLMOptions(), tokenizer_path: str | None = None,
                 on_batch: Callable[[int, float], None] | None = None):
        self.model = model
        self.tok = tokenizer
        self.tokenizer_path = tokenizer_path or model
        self.grid = tuple(float(g) for g in grid)
        self.slots = {s.lam: s for s in slots}
        missing = [g for g in self.grid if g != 0.0 and g not in self.slots]
        if missing:
            raise ValueError(f"rain_adapter.serve.engine_vllm: no LoRA for λ={missing[0]:g} of the grid")
        self.options = options
        self.max_loras = options.max_loras if options.max_loras is not None else max(1, len(slots))
        if len(slots) > self.max_loras:
            raise ValueError(f"--lambda-grid has {len(slots)} values ≠ 0 ({', '.join(f'{s.lam:g}' for s in slots)}), "
                             f"one LoRA slot each, but --max-loras is {self.max_loras}: raise --max-loras to "
                             f"{len(slots)} or serve fewer λ")
        self.max_lora_rank = options.max_lora_rank if options.max_lora_rank is not None else max_rank
        if slots and self.max_lora_rank < max_rank:
            raise ValueError(f"--max-lora-rank {self.max_lora_rank} is below the adapter's rank {max_rank}")
        self.on_batch = on_batch
        self.eos_ids, self.skip_ids = self._special_ids()
        self.vocab_size = len(tokenizer)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._engine = None
        self._lock = threading.Condition()
        self._started = False
        self._stopping = False
        self._start_error: BaseException | None = None
        self._running: dict[str, GenJob] = {}

    # ------------------------------------------------------------------ the Scheduler protocol
    def start(self) -> VLLMScheduler:
        """Build the engine (loads the model, registers every LoRA slot) on its own thread; returns
        once it can serve, or raises what stopped it."""
        with self._lock:
            if self._started:
                return self
            self._started = True
        ready = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,), name="rain-vllm", daemon=True)
        self._thread.start()
        ready.wait()
        if self._start_error is not None:
            raise RuntimeError(f"rain serve --engine vllm: the engine did not start: {self._start_error}") \
                from self._start_error
        return self

    def submit(self, job: GenJob) -> None:
        if not job.prompt_ids:
            raise JobRejected("rain_adapter.serve.engine_vllm: a request needs at least one prompt token")
        lam = self._grid_value(job.lam)
        with self._lock:
            if self._stopping:
                raise RuntimeError("rain_adapter.serve.engine_vllm: the scheduler is shutting down")
            if not self._started or self._loop is None or self._engine is None:
                raise SchedulerUnavailable("rain_adapter.serve.engine_vllm: the engine has not started")
            self._running[job.job_id] = job
        job.lam = lam
        asyncio.run_coroutine_threadsafe(self._serve(job), self._loop)

    def cancel(self, job: GenJob) -> None:
        """Mark ``job`` cancelled and abort its vLLM request (it ends with finish_reason "cancelled")."""
        job.cancelled = True
        loop = self._loop
        if loop is not None and self._engine is not None:
            asyncio.run_coroutine_threadsafe(self._abort(job.job_id), loop)

    def health(self) -> SchedulerHealth:
        alive = self._thread is not None and self._thread.is_alive()
        errored = bool(getattr(self._engine, "errored", False))
        healthy = (not self._started or alive or self._stopping) and not errored
        reason = None if healthy else ("the vLLM engine failed" if errored else "the vLLM engine thread died")
        n = len(self._running)
        return SchedulerHealth(queue_depth=0, busy=n > 0, accepting=self._started and not self._stopping and alive,
                               healthy=healthy, reason=reason)

    def stop(self, timeout: float | None = 60.0) -> None:
        """Refuse new jobs, wait for the running ones, then shut the engine down."""
        with self._lock:
            self._stopping = True
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    log.warning("rain serve: %d vLLM request(s) still running at shutdown", len(self._running))
                    break
                self._lock.wait(left)
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)

    # ---------------------------------------------------------------- internals
    def _special_ids(self) -> tuple[set[int], set[int]]:
        """(EOS ids, ids left out of the text): the tokenizer's and the checkpoint's generation
        config's EOS, as the built-in engine (``BatchScheduler._special_ids``)."""
        from transformers import GenerationConfig

        tok = self.tok
        eos: set[int] = set()
        try:
            gen_eos = GenerationConfig.from_pretrained(self.model).eos_token_id
        except (OSError, ValueError):
            gen_eos = None
        for src in (gen_eos, tok.eos_token_id):
            if src is None:
                continue
            eos.update(src if isinstance(src, (list, tuple)) else [src])
        skip = {i for i in (tok.pad_token_id, tok.bos_token_id) if i is not None} | eos
        return {int(e) for e in eos}, {int(s) for s in skip}

    def _grid_value(self, lam: float) -> float:
        for g in self.grid:
            if abs(lam - g) <= GRID_TOL:
                return g
        raise JobRejected(f"rain_adapter.serve.engine_vllm: λ={lam:g} is not served (grid: "
                          f"{', '.join(f'{g:g}' for g in self.grid)})")

    def _engine_args(self):
        from vllm.engine.arg_utils import AsyncEngineArgs

        o = self.options
        kw: dict[str, Any] = dict(model=self.model, tokenizer=self.tokenizer_path, dtype=o.dtype,
                                  tensor_parallel_size=o.tensor_parallel_size,
                                  pipeline_parallel_size=o.pipeline_parallel_size,
                                  gpu_memory_utilization=o.gpu_memory_utilization, seed=o.seed,
                                  enforce_eager=o.enforce_eager)
        if o.max_model_len is not None:
            kw["max_model_len"] = o.max_model_len
        if o.max_num_seqs is not None:
            kw["max_num_seqs"] = o.max_num_seqs
        if self.slots:
            kw.update(enable_lora=True, max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
                      max_cpu_loras=max(self.max_loras, len(self.slots)))
        return AsyncEngineArgs(**kw)

    def _thread_main(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._build())
        except BaseException as e:  # noqa: BLE001 - start() re-raises it
            self._start_error = e
            ready.set()
            loop.close()
            return
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            try:
                if self._engine is not None:
                    self._engine.shutdown()
            finally:
                loop.close()

    async def _build(self) -> None:
        if self.options.kv_cache_space_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{self.options.kv_cache_space_gib:g}"
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        engine = AsyncLLM.from_engine_args(self._engine_args())
        self._lora = {s.lam: LoRARequest(s.name, s.int_id, str(s.path)) for s in self.slots.values()}
        for req in self._lora.values():  # load every slot now: a bad LoRA fails the start, not a request
            await engine.add_lora(req)
        self._engine = engine

    async def _abort(self, request_id: str) -> None:
        if request_id in self._running:
            await self._engine.abort(request_id)

    async def _serve(self, job: GenJob) -> None:
        t0 = time.perf_counter()
        row = _RowState(job, self.tok, self.skip_ids, self.eos_ids)
        k = job.params.logprobs
        try:
            sp = sampling_params(job.params, self.eos_ids, self.vocab_size)
            lora = self._lora.get(job.lam) if job.lam != 0.0 else None
            if job.cancelled:
                row._finish("cancelled")
                return
            job.batch_size = len(self._running)
            vllm_reason = None
            async for out in self._engine.generate({"prompt_token_ids": list(job.prompt_ids)}, sp, job.job_id,
                                                   lora_request=lora):
                if job.params.prompt_logprobs and job.prompt_logprobs is None and out.prompt_logprobs is not None:
                    job.prompt_logprobs = [_entry(t, lp, k or 0) for t, lp in zip(job.prompt_ids, out.prompt_logprobs)]
                c = out.outputs[0]
                lps = c.logprobs if k is not None else None
                now = time.perf_counter()
                for i, tok in enumerate(c.token_ids):
                    before = len(row.ids)
                    row.feed(int(tok), now)
                    if lps is not None and len(row.ids) > before:
                        job.token_logprobs.append(_entry(int(tok), lps[i], k))
                    if row.finished:
                        break
                vllm_reason = c.finish_reason
                if row.finished:
                    if not out.finished:
                        await self._engine.abort(job.job_id)
                    break
            if not row.finished:
                job.t_first_token = job.t_first_token or time.perf_counter()
                row._finish("cancelled" if job.cancelled or vllm_reason == "abort" else
                            ("stop" if vllm_reason == "stop" else "length"))
        except asyncio.CancelledError:
            row._finish("cancelled") if not row.finished else None
            raise
        except BaseException as exc:  # noqa: BLE001 - reported to the waiting request
            log.exception("rain serve: vLLM generate failed for %s", job.job_id)
            if not row.finished:
                job.emit(GenEvent("error", error=exc, t=time.perf_counter()))
        finally:
            with self._lock:
                n = len(self._running)
                self._running.pop(job.job_id, None)
                self._lock.notify_all()
            if self.on_batch is not None:
                self.on_batch(max(1, n), time.perf_counter() - t0)


__all__ = ["VLLMOptions", "VLLMScheduler", "sampling_params"]
