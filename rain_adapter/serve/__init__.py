"""``rain serve``: an OpenAI-compatible server with a per-request λ, dynamic batching with per-row λ,
A/B arms of instruction strength, a durable SQLite request log and A/B reports.

Modules: ``app`` (HTTP routes), ``requests`` (typed request parsing and validation), ``responses``
(OpenAI objects, SSE, request log rows, metrics updates), ``state`` (``ServeState``), ``scheduler``
(the scheduler protocol and job types), ``batching`` (dynamic scheduler), ``continuous`` (continuous
batching with a per-token λ), ``arms`` (A/B assignment), ``metrics_db`` (request log), ``report``
(statistics, ``rain ab report``), ``prom`` (Prometheus text), ``errors`` (OpenAI-style errors),
``limits`` (API key and body size before the route, prompt-length bounds), ``request_log`` (a row for
every request), ``scoring`` (checks; unscored when one cannot run), ``thompson`` (adaptive arms),
``sampling`` (the logits processor), ``logprobs``, ``tokenize`` (``/tokenize``, ``/detokenize``),
``choices`` (``n > 1`` and lists of prompts: one job and one log row per choice).
Format validity and compliance come from :mod:`rain_adapter.evaluation.checks`.
Needs the ``serve`` extra (fastapi, uvicorn) for ``app`` / ``rain serve``.
"""
