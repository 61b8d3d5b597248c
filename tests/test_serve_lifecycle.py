"""`rain serve` end to end (issue 13): the Thompson arm policy through the server (allocation rows, the
report's posterior, the posterior rebuilt from the log; what may feed it: tests/test_serve_rewards.py), and a streaming client that goes away after
one chunk (the request is logged ``cancelled`` with its tokens and generation stops), in both modes.

No sleeps: the tests wait on events the server's own callbacks set (with timeouts)."""

from __future__ import annotations

import queue
import threading

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from rain_adapter.serve.app import create_app  # noqa: E402
from rain_adapter.serve.arms import Arm  # noqa: E402
from rain_adapter.testing.server import ServerThread  # noqa: E402

M = "tiny"
WAIT = 60.0  # seconds: an upper bound on any wait, never a duration the test relies on


def _state(tiny_serving, name, **kw):
    return tiny_serving.state(name, model_name=M, context_length=256, **kw)


def _post(srv, path, body):
    r = httpx.post(srv.base_url + path, json=body, timeout=WAIT)
    assert r.status_code == 200, r.text
    return r.json()


# ----------------------------------------------------------------------------- Thompson through the server
def test_thompson_policy_end_to_end(tiny_serving):
    arms = [Arm("a", 0.0), Arm("b", 1.5)]
    checks = ["punctuation:no_comma"]
    state = _state(tiny_serving, "thompson", arms=arms, max_tokens_cap=8, arm_policy="thompson", arm_seed=1,
                   reward_checks=checks)
    with ServerThread(create_app(state)) as srv:
        chosen = []
        for i in range(6):  # the operator's reward check is scored: each row updates the posterior
            j = _post(srv, "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": f"q{i}"}],
                                                    "max_tokens": 4, "temperature": 0, "user": f"u{i}",
                                                    "rain_checks": checks})
            assert j["rain"]["arm"] in ("a", "b") and j["rain"]["compliant"] is not None
            chosen.append(j["rain"]["arm"])
        again = _post(srv, "/v1/completions", {"model": M, "prompt": "x", "max_tokens": 2, "temperature": 0,
                                               "user": "u0"})
        assert again["rain"]["arm"] == chosen[0]  # sticky user
        before = state.policy.posterior()
        fb = _post(srv, "/v1/rain/feedback", {"request_id": again["rain"]["request_id"], "score": -1})
        assert fb["ok"]
        after = state.policy.posterior()
        assert after == before  # the request was rewarded by the reward check: one reward per request
        rows = state.db.rows()
        assert all(r["reward"] is not None and r["reward_note"] is None for r in rows)
        assert {r["assignment"] for r in rows if r["user"] != "u0" or r["endpoint"] == "chat"} == {"thompson"}
        assert [r["assignment"] for r in rows if r["endpoint"] == "completions"] == ["sticky"]
        allocs = state.db.allocations()
        assert allocs and all(a["policy"] == "thompson" for a in allocs)
        assert all(abs(sum(a["allocation"].values()) - 1) < 1e-9 for a in allocs)
        assert all(min(a["allocation"].values()) >= 0.05 - 1e-9 for a in allocs)  # the floor
        rep = httpx.get(srv.base_url + "/v1/rain/ab", timeout=WAIT).json()
        assert rep["allocation_changes"] == len(allocs)
        assert set(rep["posterior"]) == {"a", "b"}
        for name, p in rep["posterior"].items():
            assert p["allocation"] == pytest.approx(allocs[-1]["allocation"][name])
            assert p["ci95"][0] <= p["mean"] <= p["ci95"][1]
        assert sum(p["successes"] + p["failures"] for p in rep["posterior"].values()) == 7
        assert rep["reward_notes"] == {}
    # the posterior is rebuilt from the log at start
    again_state = _state(tiny_serving, "thompson", arms=arms, max_tokens_cap=8, arm_policy="thompson", arm_seed=1,
                         reward_checks=checks)
    try:
        got = again_state.policy.posterior()
        assert {a: (p["successes"], p["failures"]) for a, p in got.items()} == \
            {a: (p["successes"], p["failures"]) for a, p in after.items()}
    finally:
        again_state.db.close()


# ----------------------------------------------------------------------------- a client that goes away
PROMPTS = ["Once upon a time", "The rain", "Tell me a story", "abc"]
MAX_TOKENS = 100


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("batching", ["dynamic", "continuous"])
def test_stream_client_gone_after_one_chunk_is_logged_cancelled_and_generation_stops(tiny_serving, batching, n):
    state = _state(tiny_serving, f"gone-{batching}-{n}", max_tokens_cap=128, batching=batching)
    with ServerThread(create_app(state)) as srv:
        base = {"model": M, "max_tokens": MAX_TOKENS, "temperature": 0, "rain_lambda": 1.0}
        # a prompt whose greedy answer runs to max_tokens (no early EOS), so only the disconnect can end it
        prompt = next((p for p in PROMPTS if _post(srv, "/v1/completions", {**base, "prompt": p})
                       ["choices"][0]["finish_reason"] == "length"), None)
        assert prompt is not None, "no test prompt runs to max_tokens"

        read, cancelled, stopped = threading.Event(), threading.Event(), threading.Event()
        rows: queue.Queue = queue.Queue()
        forwards = {"n": 0, "at_cancel": None}

        def hold(module, args):  # once the client has its chunk, the next step waits for the cancel
            forwards["n"] += 1
            if read.is_set():
                cancelled.wait(WAIT)

        sched = state.scheduler
        real_cancel, real_on_batch = sched.cancel, sched.on_batch

        def cancel(job):
            forwards["at_cancel"] = forwards["n"]
            real_cancel(job)
            cancelled.set()

        def on_batch(size, seconds):  # both schedulers call it when the cancelled job has ended
            real_on_batch(size, seconds)
            if cancelled.is_set():
                stopped.set()

        sched.cancel, sched.on_batch = cancel, on_batch
        state.request_log.on_row.append(lambda row: rows.put(row) if row["status"] == "cancelled" else None)
        handle = state.model.model.register_forward_pre_hook(hold)
        try:
            with httpx.stream("POST", srv.base_url + "/v1/completions", json={**base, "prompt": prompt, "n": n,
                                                                              "stream": True}, timeout=WAIT) as r:
                assert r.status_code == 200
                first = next(line for line in r.iter_lines() if line.startswith("data: "))
                read.set()
            # leaving the block closed the connection after one chunk
            got = [rows.get(timeout=WAIT) for _ in range(n)]  # one row per choice
            assert cancelled.wait(WAIT) and stopped.wait(WAIT)
        finally:
            handle.remove()
            sched.cancel, sched.on_batch = real_cancel, real_on_batch
        assert '"text"' in first
        for row in got:
            assert row["reason"] == "the client disconnected" and row["http_status"] == 499
            assert row["completion_tokens"] < MAX_TOKENS and row["n_choices"] == n
        assert sum(r["completion_tokens"] for r in got) >= 1  # the tokens produced until the client went away
        assert sorted(r["choice_index"] for r in got) == list(range(n))
        assert forwards["n"] - forwards["at_cancel"] <= 3  # generation stopped within a few steps
        assert forwards["n"] < MAX_TOKENS // 2
        # the server keeps serving
        assert _post(srv, "/v1/completions", {**base, "prompt": "hi", "max_tokens": 2})["choices"]
