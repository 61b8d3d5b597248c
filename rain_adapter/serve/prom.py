"""A tiny Prometheus text exposition (format 0.0.4): counters, gauges, histograms with labels."""

from __future__ import annotations

import threading
from typing import Callable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
             for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    def __init__(self, name: str, help: str, kind: str, labels: Sequence[str] = ()):
        self.name, self.help, self.kind, self.labelnames = name, help, kind, tuple(labels)


class Counter(_Metric):
    def __init__(self, name, help, labels=()):
        super().__init__(name, help, "counter", labels)
        self.values: dict[tuple, float] = {}

    def inc(self, *labels: str, by: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + by

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.labelnames, k)} {v:g}" for k, v in sorted(self.values.items())]


class Gauge(_Metric):
    def __init__(self, name, help, fn: Callable[[], float]):
        super().__init__(name, help, "gauge")
        self.fn = fn

    def lines(self) -> list[str]:
        return [f"{self.name} {float(self.fn()):g}"]


class Histogram(_Metric):
    def __init__(self, name, help, buckets: Sequence[float], labels=()):
        super().__init__(name, help, "histogram", labels)
        self.buckets = tuple(buckets)
        self.values: dict[tuple, list] = {}   # labels -> [bucket counts..., sum, count]

    def observe(self, value: float, *labels: str) -> None:
        v = self.values.setdefault(labels, [0] * len(self.buckets) + [0.0, 0])
        for i, b in enumerate(self.buckets):
            if value <= b:
                v[i] += 1
        v[-2] += value
        v[-1] += 1

    def lines(self) -> list[str]:
        out = []
        for k, v in sorted(self.values.items()):
            for b, c in zip(self.buckets, v):
                le = 'le="%g"' % b
                out.append(f"{self.name}_bucket{_labels(self.labelnames, k, le)} {c}")
            inf = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.labelnames, k, inf)} {v[-1]}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, k)} {v[-2]:g}")
            out.append(f"{self.name}_count{_labels(self.labelnames, k)} {v[-1]}")
        return out


class Registry:
    def __init__(self):
        self._metrics: list[_Metric] = []
        self.lock = threading.Lock()

    def add(self, m: _Metric) -> _Metric:
        self._metrics.append(m)
        return m

    def render(self) -> str:
        out = []
        with self.lock:
            for m in self._metrics:
                out.append(f"# HELP {m.name} {m.help}")
                out.append(f"# TYPE {m.name} {m.kind}")
                out.extend(m.lines())
        return "\n".join(out) + "\n"


class ServeMetrics:
    """The server's metrics; ``queue_depth`` / ``busy`` are read at scrape time."""

    def __init__(self, queue_depth: Callable[[], float], inflight: Callable[[], float]):
        r = self.registry = Registry()
        self.requests = r.add(Counter("rain_requests_total", "Requests by endpoint, arm and status",
                                      ("endpoint", "arm", "status")))
        self.errors = r.add(Counter("rain_request_errors_total", "Rejected requests by status code", ("code",)))
        self.prompt_tokens = r.add(Counter("rain_prompt_tokens_total", "Prompt tokens", ("arm",)))
        self.completion_tokens = r.add(Counter("rain_completion_tokens_total", "Generated tokens", ("arm",)))
        self.latency = r.add(Histogram("rain_request_latency_seconds", "End-to-end latency", LATENCY_BUCKETS,
                                       ("arm",)))
        self.ttft = r.add(Histogram("rain_time_to_first_token_seconds", "Time to first token", LATENCY_BUCKETS,
                                    ("arm",)))
        self.batch_size = r.add(Histogram("rain_batch_size", "Rows per generate call", BATCH_BUCKETS))
        self.batch_seconds = r.add(Histogram("rain_batch_seconds", "Seconds per generate call", LATENCY_BUCKETS))
        self.feedback = r.add(Counter("rain_feedback_total", "Feedback records"))
        self.unscored = r.add(Counter("rain_checks_unscored_total", "rain_checks that could not run (unscored)",
                                      ("arm",)))
        r.add(Gauge("rain_queue_depth", "Requests waiting for a batch", queue_depth))
        r.add(Gauge("rain_requests_in_flight", "Requests being served", inflight))

    def on_batch(self, size: int, seconds: float) -> None:
        with self.registry.lock:
            self.batch_size.observe(size)
            self.batch_seconds.observe(seconds)
