"""Where the request log's SQLite writes run (docs/DESIGN.md §8): every ok / error / cancelled row that
a response awaits is written in a worker thread, never on the event loop. No server and no model: the
streaming multi-choice response is driven with hand-made events."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("fastapi")

from rain_adapter.serve.choices import ANOTHER_FAILED, ChoiceSet, _sse_choices  # noqa: E402
from rain_adapter.serve.prom import ServeMetrics  # noqa: E402
from rain_adapter.serve.request_log import RequestLog  # noqa: E402
from rain_adapter.serve.requests import RequestLimits, parse_completion  # noqa: E402
from rain_adapter.serve.responses import Exchange  # noqa: E402
from rain_adapter.serve.scheduler import GenEvent, GenJob, GenParams  # noqa: E402


class _DB:
    """A MetricsDB stand-in that records each row and the thread that wrote it."""

    def __init__(self):
        self.rows: list[tuple[dict, int]] = []

    def log_request(self, row):
        self.rows.append((row, threading.get_ident()))


def test_streaming_choices_write_every_row_off_the_loop_when_one_fails():
    db = _DB()
    rlog = RequestLog(db, ServeMetrics(lambda: 0.0, lambda: 0.0))

    async def main():
        req = parse_completion({"model": "m", "prompt": "x", "n": 3, "stream": True},
                               RequestLimits("m", (0.0, 1.0), frozenset(), 8))
        q, tagged = ChoiceSet.shared_events(3)
        loop = asyncio.get_running_loop()
        jobs = [GenJob("r" if i == 0 else f"r-{i}", [1], 0.0, GenParams(max_tokens=8), loop, tagged[i])
                for i in range(3)]

        def cancel(i):  # the scheduler ends a cancelled job at its next step
            jobs[i].events.put_nowait(GenEvent("done", finish_reason="cancelled", completion_tokens=1))

        exs = [Exchange(request=req, job=jobs[i], model_name="m", arm="a", lam=0.0, assignment="random", created=0,
                        cancel=lambda i=i: cancel(i), release=lambda: None, index=i, n_choices=3,
                        response_id="r") for i in range(3)]
        jobs[0].events.put_nowait(GenEvent("delta", text="a"))
        jobs[1].events.put_nowait(GenEvent("error", error=RuntimeError("boom")))
        chunks = [c async for c in _sse_choices(ChoiceSet(exs, q), rlog, None)]
        return chunks, threading.get_ident()

    chunks, loop_thread = asyncio.run(main())
    assert "boom" in chunks[-1]
    statuses = {row["id"]: (row["status"], row["reason"]) for row, _ in db.rows}
    assert statuses["r-1"][0] == "error"
    assert statuses["r"] == ("cancelled", ANOTHER_FAILED) and statuses["r-2"] == ("cancelled", ANOTHER_FAILED)
    on_loop = [row["id"] for row, tid in db.rows if tid == loop_thread]
    assert not on_loop, f"rows written on the event loop: {on_loop}"
