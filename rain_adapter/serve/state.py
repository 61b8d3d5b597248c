"""The server's state: configuration, the scheduler, arms, the request log and the metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .arms import Arm, ArmAssigner
from .errors import APIError
from .metrics_db import MetricsDB
from .prom import ServeMetrics
from .requests import RequestLimits
from .responses import RequestLog
from .scheduler import GenJob, Scheduler, make_scheduler


@dataclass
class ServeState:
    """Everything a request handler needs. ``model`` is a RainModel (or a bare HF model).

    ``scheduler``: any :class:`~rain_adapter.serve.scheduler.Scheduler`; when None, :meth:`start`
    builds the one ``batching`` names ("dynamic" or "continuous").
    """

    model: Any
    tokenizer: Any
    model_name: str
    lambda_range: tuple[float, float]
    arms: list[Arm]
    db: MetricsDB
    api_key: str | None = None
    max_tokens_cap: int = 1024
    max_batch_size: int = 8
    batch_window_ms: float = 10.0
    context_length: int | None = None
    default_temperature: float = 1.0
    batching: str = "dynamic"
    scheduler: Scheduler | None = None
    metrics: ServeMetrics | None = None
    assigner: ArmAssigner | None = None
    inflight: int = 0
    started: float = field(default_factory=time.time)
    limits: RequestLimits = field(init=False)
    request_log: RequestLog = field(init=False)

    def __post_init__(self) -> None:
        lo, hi = self.lambda_range
        for a in self.arms:
            if not lo <= a.lam <= hi:
                raise ValueError(f"arm {a.name!r}: λ={a.lam} outside the adapter's lambda_range [{lo}, {hi}]")
        self.assigner = ArmAssigner(self.arms)
        if self.context_length is None:
            cfg = getattr(self.model, "config", None)
            self.context_length = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
        self.metrics = ServeMetrics(self.queue_depth, lambda: self.inflight)
        self.limits = RequestLimits(model_name=self.model_name, lambda_range=(lo, hi),
                                    arm_names=frozenset(self.assigner.by_name), max_tokens_cap=self.max_tokens_cap,
                                    default_temperature=self.default_temperature)
        self.request_log = RequestLog(self.db, self.metrics)

    def queue_depth(self) -> int:
        return self.scheduler.health().queue_depth if self.scheduler is not None else 0

    def start(self) -> None:
        """Build the scheduler (unless one was given) and start it."""
        if self.scheduler is None:
            self.scheduler = make_scheduler(self.batching, self.model, self.tokenizer,
                                            max_batch_size=self.max_batch_size, batch_window_ms=self.batch_window_ms,
                                            on_batch=self.metrics.on_batch)
        self.scheduler.start()

    def stop(self) -> None:
        """Drain the scheduler, then close the request log (blocking: run it in a thread)."""
        if self.scheduler is not None:
            self.scheduler.stop()
        self.db.close()

    def submit(self, job: GenJob) -> None:
        """Hand ``job`` to the scheduler; it counts as in flight until the response calls :meth:`release`."""
        self.inflight += 1
        try:
            self.scheduler.submit(job)
        except RuntimeError as e:
            self.inflight -= 1
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None

    def release(self) -> None:
        self.inflight -= 1


def serve_state_from(model, tokenizer, *, model_name: str, db_path, arms: list[Arm] | None = None,
                     lam: float | None = None, **kw) -> ServeState:
    """A :class:`ServeState` for a RainModel: λ range from its config; one arm "default" when no arms."""
    cfg = getattr(model, "rain_config", None)
    lo, hi = (tuple(cfg.lambda_range) if cfg is not None else (0.0, 0.0))
    if not arms:
        default = lam if lam is not None else (cfg.default_lambda if cfg is not None else 0.0)
        arms = [Arm("default", float(default), 1.0)]
    return ServeState(model=model, tokenizer=tokenizer, model_name=model_name, lambda_range=(float(lo), float(hi)),
                      arms=arms, db=MetricsDB(db_path), **kw)


__all__ = ["ServeState", "serve_state_from"]
