"""``rain serve``: an OpenAI-compatible server with a per-request λ, dynamic batching with per-row λ,
A/B arms of instruction strength, a durable SQLite request log and A/B reports.

Modules: ``app`` (HTTP routes), ``requests`` (typed request parsing and validation), ``responses``
(OpenAI objects, SSE, request log rows, metrics updates), ``state`` (``ServeState``), ``scheduler``
(the scheduler protocol and job types), ``batching`` (dynamic scheduler), ``continuous`` (continuous
batching with a per-token λ), ``arms`` (A/B assignment), ``metrics_db`` (request log), ``report``
(statistics, ``rain ab report``), ``prom`` (Prometheus text), ``errors`` (OpenAI-style errors).
Format validity and compliance come from :mod:`rain_adapter.evaluation.checks`.
Needs the ``serve`` extra (fastapi, uvicorn) for ``app`` / ``rain serve``.
"""
