"""Rewards a client cannot steer (issue 22, part 3): the Thompson attack replayed through the server.

The attack (measured on a real server): one anonymous client sent 12 requests in under a second
that chose their own arm (``rain_arm``), carried an always-true check of their own (``rain_checks``)
and asked ``n = 16``; the posterior counted 12 × 16 successes for that arm and 58 of the next 60
users were put on it. Here the same requests leave the posterior and the allocation exactly where
they were; the variants without ``rain_arm`` (server-assigned, client checks, n = 16) and with the
operator's reward checks are rate limited per client and counted once per request."""

from __future__ import annotations

import collections
import concurrent.futures as cf

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from rain_adapter.serve.app import create_app  # noqa: E402
from rain_adapter.serve.arms import Arm  # noqa: E402
from rain_adapter.serve.report import ab_report  # noqa: E402
from rain_adapter.testing.server import ServerThread  # noqa: E402

M = "tiny"
WAIT = 120.0
ARMS = [Arm("a", 0.0), Arm("b", 1.5)]
#: true of every answer: at least 0 characters
ALWAYS_TRUE = [{"instruction_id": "spec:char_count", "kwargs": {"min": 0}}]


def _state(tiny_serving, name, **kw):
    return tiny_serving.state(name, model_name=M, context_length=256, max_tokens_cap=8, arms=ARMS, arm_policy="thompson", arm_seed=3,
                            batch_window_ms=5.0, **kw)


def _chat(srv, i, **extra):
    body = {"model": M, "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 1, "temperature": 0,
            **extra}
    r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=WAIT)
    assert r.status_code == 200, r.text
    return r.json()


def _attack(srv, n_requests=12, **extra):
    """The attacker's burst: concurrent, anonymous, n = 16, an always-true check of its own."""
    with cf.ThreadPoolExecutor(n_requests) as pool:
        return list(pool.map(lambda i: _chat(srv, f"attack{i}", n=16, rain_checks=ALWAYS_TRUE, **extra),
                             range(n_requests)))


def _next_users(srv, n=60):
    return collections.Counter(_chat(srv, f"user{i}", user=f"user-{i}")["rain"]["arm"] for i in range(n))


def _counts(state):
    return {a: (p["successes"], p["failures"]) for a, p in state.policy.posterior().items()}


def test_the_attack_leaves_the_allocation_unmoved(tiny_serving):
    state = _state(tiny_serving, "attack")
    with ServerThread(create_app(state)) as srv:
        before = state.policy.allocation()
        got = _attack(srv, rain_arm="b")
        assert all(j["rain"]["arm"] == "b" and len(j["choices"]) == 16 for j in got)  # served as asked
        assert _counts(state) == {"a": (0, 0), "b": (0, 0)}
        assert state.policy.allocation() == before == {"a": 0.5, "b": 0.5}
        users = _next_users(srv)
        rows, allocs = state.db.rows(), state.db.allocations()
    print(f"\nattack replay: allocation {before} -> {state.policy.allocation()}; next 60 users {dict(users)}")
    assert users["b"] <= 40, users  # 58 of 60 before the fix
    attack_rows = [r for r in rows if r["user"] is None]
    assert len(attack_rows) == 12 * 16 and all(r["reward"] is None for r in attack_rows)
    assert {r["reward_note"] for r in attack_rows} == {"client-chosen arm"}
    assert allocs == []  # no allocation change was ever logged
    assert ab_report(rows, allocs)["reward_notes"] == {"client-chosen arm": 12 * 16, "awaiting feedback": 60}


#: false of every short answer: the operator's reward in the tests below
NEVER = [{"instruction_id": "spec:char_count", "kwargs": {"min": 100000}}]


def test_server_assigned_burst_gives_one_operator_reward_per_request_under_the_rate_limit(tiny_serving):
    """Without ``rain_arm``: the client's always-true check does not count, only the operator's (false
    here); one reward per request although n = 16; at most 5 from one anonymous address."""
    state = _state(tiny_serving, "burst", reward_checks=NEVER)
    with ServerThread(create_app(state)) as srv:
        got = _attack(srv)
        assert all(c["rain"]["compliant"] is True for j in got for c in j["choices"])  # in the log only
        counts = _counts(state)
        rows = state.db.rows()
    assert sum(s for s, _ in counts.values()) == 0 and sum(f for _, f in counts.values()) == 5
    first = [r for r in rows if r["choice_index"] == 0]
    assert len(first) == 12 and len(rows) == 12 * 16
    assert sorted(str(r["reward"]) for r in first) == ["0"] * 5 + ["None"] * 7
    assert {r["reward_note"] for r in first if r["reward"] is None} == {"rate limited"}
    assert {r["reward_note"] for r in rows if r["choice_index"]} == {"one reward per request"}
    assert {r["client"] for r in rows} == {"127.0.0.1"}


def test_feedback_rewards_only_waiting_rows_under_the_rate_limit_and_survives_a_restart(tiny_serving):
    state = _state(tiny_serving, "feedback", reward_rate=(2, 3600.0))
    with ServerThread(create_app(state)) as srv:
        mine = [_chat(srv, i, user="carol") for i in range(3)]
        chosen = _chat(srv, "x", user="dave", rain_arm="a")
        many = _chat(srv, "y", user="erin", n=3)
        for j in mine + [chosen]:
            r = httpx.post(srv.base_url + "/v1/rain/feedback", timeout=WAIT,
                           json={"request_id": j["rain"]["request_id"], "score": 1})
            assert r.status_code == 200, r.text
        for c in many["choices"]:  # choice j > 0 never counts; choice 0 does
            httpx.post(srv.base_url + "/v1/rain/feedback", json={"request_id": c["rain"]["request_id"], "score": -1},
                       timeout=WAIT).raise_for_status()
        counts = _counts(state)
        rows = {r["id"]: r for r in state.db.rows()}
    arm = mine[0]["rain"]["arm"]
    assert counts[arm][0] == 2  # carol: 3 feedbacks, 2 under the limit
    assert sum(s for s, _ in counts.values()) == 2 and sum(f for _, f in counts.values()) == 1  # erin's choice 0
    notes = [rows[j["rain"]["request_id"]]["reward_note"] for j in mine]
    assert notes == [None, None, "rate limited"]
    assert rows[chosen["rain"]["request_id"]]["reward_note"] == "client-chosen arm"
    again = _state(tiny_serving, "feedback", reward_rate=(2, 3600.0))  # the posterior is rebuilt from the log
    try:
        assert _counts(again) == counts
    finally:
        again.db.close()


# ----------------------------------------------------------------------------- the pieces, no server
def test_rate_limiter_is_a_sliding_window_per_key():
    from rain_adapter.serve.rewards import RateLimiter, client_key

    now = [0.0]
    lim = RateLimiter(2, 10.0, clock=lambda: now[0], max_keys=2)
    assert [lim.allow("u") for _ in range(3)] == [True, True, False]
    assert lim.allow("v")
    now[0] = 10.0
    assert lim.allow("u") and lim.allow("u") and not lim.allow("u")
    lim.allow("w")  # three keys: the least recent one is forgotten
    assert set(lim._hits) == {"u", "w"}
    assert client_key("alice", "1.2.3.4") == "user:alice" and client_key(None, "1.2.3.4") == "client:1.2.3.4"


def test_reward_options_are_checked_at_start(tmp_path):
    from rain_adapter.serve.rewards import load_reward_checks, parse_rate, parse_reward_checks
    from rain_adapter.serve.scoring import server_registry

    assert parse_rate("5/60") == (5, 60.0) and parse_rate("1/0.5") == (1, 0.5)
    for bad in ("5", "0/60", "5/0", "a/b", "5/inf"):
        with pytest.raises(ValueError, match="--reward-rate-limit"):
            parse_rate(bad)
    f = tmp_path / "r.yaml"
    f.write_text("- punctuation:no_comma\n- {instruction_id: 'spec:word_count', kwargs: {max: 50}}\n")
    checks = parse_reward_checks(load_reward_checks(str(f)), server_registry())
    assert [c.instruction_id for c in checks] == ["punctuation:no_comma", "spec:word_count"]
    assert parse_reward_checks(load_reward_checks('["punctuation:no_comma"]'), server_registry())
    for bad, msg in (('["nope:nope"]', "unknown instruction_id"), ("[]", "at least one"),
                     (str(tmp_path / "missing.json"), "neither inline JSON nor a file"), ("[1,", "not valid JSON")):
        with pytest.raises(ValueError, match="--reward-checks") as e:
            parse_reward_checks(load_reward_checks(bad), server_registry())
        assert msg in str(e.value)


def test_reward_checks_need_the_adaptive_policy(tiny_serving):
    with pytest.raises(ValueError, match="--arm-policy thompson"):
        tiny_serving.state("fixed", model_name=M, arms=ARMS, reward_checks=NEVER)


def test_reward_of_reads_the_logged_decision_only():
    from rain_adapter.serve.thompson import reward_of

    assert reward_of({"status": "ok", "reward": 1}) is True and reward_of({"status": "ok", "reward": 0}) is False
    # the request's own compliance and feedback are not rewards; a row that is not ok never is
    assert reward_of({"status": "ok", "compliant": 1, "feedback": 2.0}) is None
    assert reward_of({"status": "cancelled", "reward": 1}) is None
    assert reward_of({"status": "ok", "reward": "x"}) is None
