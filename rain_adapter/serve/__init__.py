"""``rain serve``: an OpenAI-compatible server with a per-request λ, dynamic batching with per-row λ,
A/B arms of instruction strength, a durable SQLite request log and A/B reports.

Modules: ``app`` (HTTP API), ``batching`` (scheduler), ``arms`` (A/B assignment), ``metrics_db``
(request log), ``report`` (statistics, ``rain ab report``), ``checks`` (format / compliance),
``prom`` (Prometheus text), ``runner`` (in-process server thread), ``cli`` (``add_parser``).
Needs the ``serve`` extra (fastapi, uvicorn) for ``app`` / ``runner`` / ``rain serve``.
"""
