"""Pure pieces of issue 13: Thompson allocation (simulated), hash assignment, a report that never fails
on a row, unscored checks, and a client disconnect cancelling a job (no server)."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from rain_adapter.serve.arms import Arm, ArmAssigner
from rain_adapter.serve.report import ab_report, format_report, to_json
from rain_adapter.serve.thompson import ThompsonPolicy, prob_best, simulate, with_floor


def test_thompson_converges_to_the_best_arm_and_keeps_the_floor():
    out = simulate([0.2, 0.5, 0.8], 1500, floor=0.05, seed=3)
    alloc = out["allocation"]
    assert max(alloc, key=alloc.get) == "arm2" and alloc["arm2"] > 0.85
    assert all(v >= 0.05 - 1e-12 for v in alloc.values()) and math.isclose(sum(alloc.values()), 1.0)
    assert out["pulls"]["arm2"] > out["pulls"]["arm1"] > 0 and out["pulls"]["arm0"] > 0
    post = out["posterior"]["arm2"]
    assert abs(post["mean"] - 0.8) < 0.05 and post["ci95"][0] < post["mean"] < post["ci95"][1]
    assert out["changes"] > 0
    # seeded: the same run twice is the same run
    assert simulate([0.2, 0.5, 0.8], 200, seed=3)["pulls"] == simulate([0.2, 0.5, 0.8], 200, seed=3)["pulls"]


def test_floor_formula_and_sticky_users():
    import numpy as np

    p = with_floor(np.array([1.0, 0.0, 0.0, 0.0]), 0.05)
    assert p.tolist() == pytest.approx([0.85, 0.05, 0.05, 0.05])
    assert with_floor(np.array([1.0, 0.0]), 0.9).tolist() == [0.5, 0.5]  # floor capped at 1/K
    pb = prob_best([50, 0], [0, 50], np.random.default_rng(0), 1000)
    assert pb[0] == 1.0
    logged = []
    pol = ThompsonPolicy(["a", "b"], on_change=logged.append)
    arm, how = pol.pick("alice")
    assert how == "thompson" and pol.pick("alice") == (arm, "sticky")
    for _ in range(5):
        pol.update("a", True)
    assert logged and logged[-1]["a"] > 0.5


def test_hash_assignment_is_deterministic_without_a_user():
    arms = [Arm("x", 0.0), Arm("y", 1.0), Arm("z", 2.0)]
    a, b = ArmAssigner(arms, assignment="hash"), ArmAssigner(list(arms), assignment="hash")
    keys = [json.dumps([{"role": "user", "content": f"q{i}"}]) for i in range(300)]
    first = [a.choose(None, None, None, k) for k in keys]
    assert first == [b.choose(None, None, None, k) for k in keys]
    assert {h for _, _, h in first} == {"hash"} and len({n for n, _, _ in first}) == 3
    with pytest.raises(ValueError):
        ArmAssigner(arms, assignment="nope")


def test_report_never_fails_and_json_is_strict():
    rows = [dict(id="1", arm="a", lam=0.5, status="ok", format_valid=1, compliant=1, latency_s=0.1,
                 feedback=float("inf")),
            dict(id="2", arm="a", lam=float("nan"), status="ok", format_valid=None, compliant=0,
                 latency_s=float("nan"), feedback=2.0, unscored=2),
            dict(id="3", arm="λ=0.6", lam=0.6, status="ok", compliant="weird", latency_s="slow"),
            dict(id="4", arm=None, status="rejected", reason="user: bad"),
            dict(id="5", arm="b", status="cancelled"),
            dict(id="6", arm="b", status="ok", compliant=1, reward=None, reward_note="client-chosen arm"),
            dict(id="7", arm="b", status="ok", reward=1)]
    rep = ab_report(rows, [{"allocation": {"a": 0.7, "b": 0.3}}])
    assert rep["n_by_status"] == {"ok": 5, "rejected": 1, "cancelled": 1}
    assert rep["skipped_values"] == {"feedback": 1, "lam": 1, "latency_s": 2, "compliant": 1}
    assert rep["arms"]["a"]["unscored"] == 2 and "λ=0.6" in rep["arms"]
    assert rep["posterior"]["a"]["allocation"] == 0.7 and 0 < rep["posterior"]["a"]["mean"] < 1
    text = to_json({**rep, "x": float("inf")})
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert "posterior" in format_report(rep)
    # the posterior counts the rewards the server logged, never compliance or feedback by themselves
    assert (rep["posterior"]["a"]["successes"], rep["posterior"]["a"]["failures"]) == (0, 0)
    assert (rep["posterior"]["b"]["successes"], rep["posterior"]["b"]["failures"]) == (1, 0)
    assert rep["reward_notes"] == {"client-chosen arm": 1}
    assert "no reward: client-chosen arm 1" in format_report(rep)


def test_a_check_that_cannot_run_is_unscored_not_non_compliant(monkeypatch):
    from rain_adapter.evaluation.registry import CheckRegistry
    from rain_adapter.serve.requests import parse_rain_checks
    from rain_adapter.serve.scoring import probe_checks, score_output

    real = CheckRegistry.check

    def flaky(self, iid, kwargs, response, prompt=None):   # lm-eval's checker without NLTK's data
        if iid == "length_constraints:number_sentences":
            raise LookupError("Resource punkt_tab not found")
        return real(self, iid, kwargs, response, prompt=prompt)

    monkeypatch.setattr(CheckRegistry, "check", flaky)
    cs = parse_rain_checks([{"instruction_id": "length_constraints:number_sentences",
                             "kwargs": {"num_sentences": 1, "relation": "at least"}}, "punctuation:no_comma"])
    sc = score_output("</think>no commas", cs)
    assert sc.compliant is True and sc.unscored == 1 and "punkt_tab" in sc.results[0]["error"]
    only = score_output("</think>x", cs[:1])
    assert only.compliant is None and only.unscored == 1
    assert any("number_sentences" in w for w in probe_checks())


def test_disconnect_cancels_the_job_and_logs_cancelled_with_tokens():
    from rain_adapter.serve.requests import parse_chat, RequestLimits
    from rain_adapter.serve.responses import Exchange, reply
    from rain_adapter.serve.scheduler import GenEvent, GenJob, GenParams

    class Log:
        rows: list = []

        async def finish(self, ex, text, done, status, reason=None, http_status=None):
            row = dict(status=status, text=text, tokens=done.completion_tokens if done else None, reason=reason)
            self.rows.append(row)
            return row

    async def main():
        req = parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]},
                         RequestLimits("m", (0.0, 1.0), frozenset(), 8))
        job = GenJob("r", [1, 2], 0.0, GenParams(max_tokens=8), asyncio.get_running_loop(), asyncio.Queue())
        cancelled = []

        def cancel():  # the scheduler's side: the job ends at its next decode step
            cancelled.append(True)
            job.events.put_nowait(GenEvent("done", finish_reason="cancelled", completion_tokens=3))

        job.events.put_nowait(GenEvent("delta", text="ab"))
        ex = Exchange(request=req, job=job, model_name="m", arm="a", lam=0.0, assignment="random", created=0,
                      cancel=cancel, release=lambda: None)
        gone = asyncio.Event()

        async def disconnected():
            await gone.wait()

        task = asyncio.ensure_future(reply(ex, Log(), disconnected))
        await asyncio.sleep(0)  # let reply take the delta (a yield to the loop, not a wait)
        gone.set()
        resp = await task
        return resp, cancelled

    resp, cancelled = asyncio.run(main())
    assert cancelled == [True] and resp.status_code == 499
    assert Log.rows[-1] == dict(status="cancelled", text="ab", tokens=3, reason="the client disconnected")
