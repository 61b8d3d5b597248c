"""``rain serve``: an OpenAI-compatible server with a per-request λ, dynamic batching with per-row λ,
A/B arms of instruction strength, a durable SQLite request log and A/B reports.

Modules: ``app`` (HTTP routes), ``requests`` (typed request parsing and validation), ``fields`` (the
single-field readers the parsers share), ``responses`` (OpenAI objects, SSE), ``state`` (``ServeState``),
``scheduler`` (the scheduler protocol and job types), ``scheduler_factory`` (``make_scheduler``),
``batching`` (dynamic scheduler), ``continuous`` (continuous batching with a per-token λ), ``arms`` (A/B
assignment), ``metrics_db`` (request log storage), ``report`` (statistics, ``rain ab report``), ``prom``
(Prometheus text), ``errors`` (OpenAI-style errors), ``limits`` (API key and body size before the route,
prompt-length bounds), ``request_log`` (builds, scores and writes a row for every request, updates the
metrics), ``scoring`` (checks; unscored when one cannot run), ``thompson`` (adaptive arms),
``sampling`` (the logits processor), ``logprobs``, ``tokenize`` (``/tokenize``, ``/detokenize``),
``choices`` (``n > 1`` and lists of prompts: one job and one log row per choice), ``engine_vllm``
(``--engine vllm``: vLLM's async engine behind the scheduler protocol; imports vLLM).
Format validity comes from :mod:`rain_adapter.evaluation.checks`, compliance from
:mod:`rain_adapter.evaluation.scoring`.
Needs the ``serve`` extra (fastapi, uvicorn) for ``app`` / ``rain serve``.
"""
