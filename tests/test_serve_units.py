"""Unit tests of the serve pieces that need no HTTP server: arms, statistics, request log, checks,
request parsing, the scheduler protocol, row tracking of the batcher, and the `rain ab report` command."""

from __future__ import annotations

import asyncio
import json
import math
import random
import sqlite3
import subprocess
import sys

import pytest

from rain_adapter.evaluation.checks import think_format_ok
from rain_adapter.serve.arms import Arm, ArmAssigner, load_arms, parse_arms
from rain_adapter.serve.errors import APIError
from rain_adapter.serve.metrics_db import MetricsDB
from rain_adapter.serve.report import (
    ab_report,
    format_report,
    mean_ci,
    percentile_ci,
    plot_report,
    two_proportion_z,
    wilson,
)


def test_arms_sticky_and_proportional_over_10000_ids():
    arms = [Arm("a", 0.0, 1.0), Arm("b", 0.5, 2.0), Arm("c", 1.0, 1.0)]
    asg = ArmAssigner(arms)
    ids = [f"user-{i}" for i in range(10_000)]
    first = [asg.assign(u)[0].name for u in ids]
    # sticky: same user -> same arm, also from a fresh assigner (stable hash, not Python's salted hash)
    fresh = ArmAssigner(list(arms))
    assert first == [fresh.assign(u)[0].name for u in ids]
    assert all(asg.assign(u)[1] == "sticky" for u in ids[:10])
    counts = {n: first.count(n) for n in "abc"}
    expect = {"a": 2500, "b": 5000, "c": 2500}
    # each share within 4 binomial standard deviations
    for n, e in expect.items():
        sd = math.sqrt(10_000 * (e / 10_000) * (1 - e / 10_000))
        assert abs(counts[n] - e) < 4 * sd, counts
    # the assignment is a fixed function of the id: pin one value
    import hashlib

    u = int(hashlib.sha256(b"rain-arms:user-0").hexdigest()[:16], 16) / 2**64
    assert first[0] == ("a" if u < 0.25 else "b" if u < 0.75 else "c")


def test_arms_random_without_user_is_proportional():
    asg = ArmAssigner([Arm("x", 0.0, 3.0), Arm("y", 1.0, 1.0)], rng=random.Random(0))
    picks = [asg.assign(None) for _ in range(10_000)]
    assert all(how == "random" for _, how in picks)
    share = sum(a.name == "x" for a, _ in picks) / 10_000
    assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 10_000)


def test_arms_files_and_errors(tmp_path):
    y = tmp_path / "arms.yaml"
    y.write_text("arms:\n  - {name: control, lambda: 0.0, weight: 1}\n  - {name: rain, lambda: 1.0}\n")
    assert load_arms(y) == [Arm("control", 0.0, 1.0), Arm("rain", 1.0, 1.0)]
    j = tmp_path / "arms.json"
    j.write_text(json.dumps([{"name": "a", "lambda": 0.5, "weight": 2}]))
    assert load_arms(j) == [Arm("a", 0.5, 2.0)]
    for bad, words in [([], "non-empty"), ([{"name": "a"}], "lambda"), ([{"name": "a", "lambda": 1, "weight": 0}],
                       "weight"), ([{"name": "a", "lambda": 1}, {"name": "a", "lambda": 2}], "unique")]:
        with pytest.raises(ValueError, match=words):
            parse_arms(bad, "f.yaml")


def test_wilson_and_tests_known_values():
    p, lo, hi = wilson(8, 10)
    assert p == 0.8 and lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 0) == (None, None, None)
    p, lo, hi = wilson(0, 20)
    assert p == 0 and lo == 0 and 0 < hi < 0.2
    # the interval contains p̂ at the edges for every n (round-off once gave lo = 2.8e-17 > p̂ = 0 at n = 12)
    for n in range(1, 200):
        for k in (0, n):
            p, lo, hi = wilson(k, n)
            assert lo <= p <= hi
    z, pv = two_proportion_z(60, 100, 40, 100)
    assert z == pytest.approx(2.8284, abs=1e-3) and pv == pytest.approx(0.00468, abs=1e-4)
    assert two_proportion_z(5, 5, 5, 5) == (None, None)
    m, lo, hi = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and hi - m == pytest.approx(1.96 * math.sqrt(5 / 3) / 2, rel=1e-3)
    est, lo, hi = percentile_ci(list(range(1, 101)), 50)
    assert lo <= est <= hi and est == pytest.approx(50.5)


def _rows(n=200, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        arm, p = ("a", 0.9) if i % 2 else ("b", 0.5)
        rows.append(dict(id=f"r{i}", arm=arm, lam=0.0 if arm == "b" else 1.0, status="ok",
                         format_valid=int(rng.random() < p), compliant=int(rng.random() < p),
                         latency_s=rng.uniform(0.1, 1.0), ttft_s=0.05, feedback=rng.choice([None, 1.0, 5.0])))
    rows.append(dict(id="bad", arm="a", status="error"))
    return rows


def test_ab_report_and_png(tmp_path):
    rep = ab_report(_rows())
    assert rep["n_total"] == 200 and rep["n_failed"] == 1
    a, b = rep["arms"]["a"], rep["arms"]["b"]
    assert a["n"] == b["n"] == 100 and a["lambda"] == 1.0
    for arm in (a, b):
        for key in ("format_valid_rate", "compliance_rate", "mean_feedback", "latency_p50_s", "latency_p99_s"):
            v, (lo, hi) = arm[key]["value"], arm[key]["ci95"]
            assert lo <= v <= hi, key
    t = [t for t in rep["tests"] if t["metric"] == "format_valid"][0]
    assert t["p_value"] < 0.01  # 0.9 vs 0.5 over 100 each
    txt = format_report(rep)
    assert "two-proportion" in txt and "a vs b" in txt
    png = plot_report(rep, tmp_path / "ab.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_db_roundtrip_and_feedback(tmp_path):
    db = MetricsDB(tmp_path / "x" / "log.sqlite")
    db.log_request(dict(id="r1", arm="a", lam=1.0, status="ok", format_valid=True, compliant=None,
                        checks_json=[{"instruction_id": "x", "ok": True}], latency_s=0.5))
    assert db.add_feedback("r1", 3)
    assert not db.add_feedback("r1", 5)  # one feedback per request: the first stands (the API answers 409)
    assert db.has_request("r1") and not db.has_request("r2")
    (row,) = db.rows()
    assert row["feedback"] == 3 and row["format_valid"] == 1 and json.loads(row["checks_json"])[0]["ok"]
    # committed on return: visible to another connection before close
    assert sqlite3.connect(tmp_path / "x" / "log.sqlite").execute("SELECT count(*) FROM requests").fetchone() == (1,)
    assert sqlite3.connect(tmp_path / "x" / "log.sqlite").execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()
    assert MetricsDB(tmp_path / "x" / "log.sqlite").request_ids() == {"r1"}


def test_think_format_and_checks():
    """The server scores with evaluation's definitions (think_format_ok, follow_instructions)."""
    from rain_adapter.serve.requests import RainCheck, parse_rain_checks
    from rain_adapter.serve.responses import score_output

    assert think_format_ok("reasoning here</think>\n\nThe answer.")
    assert not think_format_ok("reasoning here</think>   \n")
    assert not think_format_ok("no closing tag at all")
    checks = parse_rain_checks([{"instruction_id": "punctuation:no_comma", "kwargs": {}},
                                {"id": "keywords:existence", "kwargs": {"keywords": ["cat"]}}])
    sc = score_output("think, think</think>A cat sat", checks)
    assert sc.compliant is True and [r["ok"] for r in sc.results] == [True, True] and sc.format_valid
    assert score_output("x</think>A dog, sat", checks).compliant is False
    none = score_output("anything", ())
    assert (none.compliant, none.results, none.format_valid) == (None, [], False)
    # IFEval record layout
    rec = parse_rain_checks({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]})
    assert rec == (RainCheck("punctuation:no_comma", {}),)
    for bad in ("x", [3], [{"instruction_id": "not:a_check"}], {"instruction_id_list": None}):
        with pytest.raises(APIError) as ei:
            parse_rain_checks(bad)
        assert ei.value.status == 400 and ei.value.param == "rain_checks"


def test_unscorable_check_is_left_out_of_compliance():
    """A check evaluation cannot score (bad kwargs) is recorded with its error and does not count."""
    from rain_adapter.serve.requests import parse_rain_checks
    from rain_adapter.serve.responses import score_output

    checks = parse_rain_checks(["punctuation:no_comma", {"instruction_id": "startend:end_checker",
                                                          "kwargs": {"end_phrase": 5}}])
    sc = score_output("r</think>no commas here", checks)
    assert sc.compliant is True
    assert sc.results[0] == {"instruction_id": "punctuation:no_comma", "ok": True}
    assert sc.results[1]["ok"] is None and "bad kwargs" in sc.results[1]["error"]
    only_bad = score_output("r</think>x", checks[1:])
    assert only_bad.compliant is None and only_bad.results[0]["ok"] is None


# ----------------------------------------------------------------------------- request parsing
def _limits(**kw):
    from rain_adapter.serve.requests import RequestLimits

    return RequestLimits(**{**dict(model_name="m", lambda_range=(0.0, 2.0), arm_names=frozenset({"a", "b"}),
                                   max_tokens_cap=64, default_temperature=1.0), **kw})


def _chat_body(**kw):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}


def test_parse_chat_request_fields():
    from rain_adapter.serve.requests import parse_chat

    req = parse_chat(_chat_body(max_completion_tokens=5, max_tokens=9, temperature=0, top_p=0.5, stop="END",
                                seed=3, rain_lambda=1, user="u", stream=True,
                                stream_options={"include_usage": True}, rain_checks=["punctuation:no_comma"],
                                messages=[{"role": "developer", "content": [{"type": "text", "text": "be "},
                                                                             {"type": "text", "text": "brief"}]},
                                          {"role": "user", "content": None}]),
                     _limits())
    assert req.chat and req.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": ""})
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.stop, s.seed) == (5, 0.0, 0.5, ("END",), 3)
    assert (req.rain.lam, req.rain.arm, len(req.rain.checks)) == (1.0, None, 1)
    assert (req.user, req.stream, req.include_usage) == ("u", True, True)
    # defaults: server temperature, no max_tokens (filled from the context), no stream
    d = parse_chat(_chat_body(), _limits(default_temperature=0.7))
    assert (d.sampling.temperature, d.sampling.max_tokens, d.stream, d.include_usage) == (0.7, None, False, False)
    g = d.sampling.gen_params(prompt_len=250, context_length=256, cap=64, prompt_param="messages")
    assert g.max_tokens == 6


@pytest.mark.parametrize("field,value,code", [
    ("model", None, "missing_required_parameter"),
    ("messages", [], "missing_required_parameter"),
    ("messages", [{"role": "robot", "content": "x"}], "invalid_value"),
    ("messages", [{"role": "user", "content": [{"type": "image_url"}]}], "invalid_value"),
    ("max_tokens", 0, "invalid_value"),
    ("max_tokens", 1.5, "invalid_value"),
    ("max_tokens", 65, "max_tokens_exceeded"),
    ("max_completion_tokens", "5", "invalid_value"),
    ("n", 17, "invalid_value"),
    ("n", 0, "invalid_value"),
    ("logprobs", 3, "invalid_value"),          # chat: a boolean (top_logprobs is the count)
    ("top_logprobs", 2, "invalid_value"),      # without logprobs=true
    ("response_format", {"type": "json_schema"}, "not_supported"),
    ("tools", [{"type": "function"}], "not_supported"),
    ("temperature", 2.5, "invalid_value"),
    ("temperature", True, "invalid_value"),
    ("top_p", 0, "invalid_value"),
    ("seed", "x", "invalid_value"),
    ("stop", ["ok", ""], "invalid_value"),
    ("stop", ["s"] * 17, "invalid_value"),
    ("rain_arm", "zzz", "invalid_value"),
    ("rain_lambda", "high", "invalid_value"),
    ("rain_lambda", float("nan"), "invalid_value"),
    ("rain_lambda", 2.5, "lambda_out_of_range"),
    ("rain_checks", [{"instruction_id": "no:such"}], "invalid_value"),
    ("user", 7, "invalid_value"),
    ("stream", "yes", "invalid_value"),
])
def test_parse_chat_bad_field_is_400_naming_it(field, value, code):
    from rain_adapter.serve.requests import parse_chat

    with pytest.raises(APIError) as ei:
        parse_chat(_chat_body(**{field: value}), _limits())
    e = ei.value
    assert (e.status, e.param, e.code) == (400, field, code), e.message
    assert e.body()["error"]["param"] == field


def test_parse_model_mismatch_is_404():
    from rain_adapter.serve.requests import parse_chat

    with pytest.raises(APIError) as ei:
        parse_chat(_chat_body(model="other"), _limits())
    assert (ei.value.status, ei.value.param, ei.value.code) == (404, "model", "model_not_found")


def test_parse_completion_prompt_and_context():
    from rain_adapter.serve.requests import parse_completion
    from rain_adapter.testing.fixtures import make_tokenizer

    tok = make_tokenizer()
    assert parse_completion({"model": "m", "prompt": ["one string"]}, _limits()).prompt == "one string"
    ids = parse_completion({"model": "m", "prompt": [1, 2, 3]}, _limits())
    assert ids.encode(tok) == [1, 2, 3] and not ids.chat
    two = parse_completion({"model": "m", "prompt": ["a", "b"]}, _limits())
    assert two.prompt == "a" and [r.prompt for r in two.split()] == ["a", "b"] and two.texts() == ["a", "b"]
    for bad in (None, [], [1, True], ["a", [1]], ["a"] * 65, 5):
        with pytest.raises(APIError) as ei:
            parse_completion({"model": "m", "prompt": bad}, _limits())
        assert (ei.value.status, ei.value.param) == (400, "prompt")
    with pytest.raises(APIError) as ei:
        parse_completion({"model": "m", "prompt": [len(tok)]}, _limits()).encode(tok)
    assert ei.value.param == "prompt"
    sp = parse_completion({"model": "m", "prompt": "x", "max_tokens": 8}, _limits()).sampling
    for prompt_len, param in ((256, "prompt"), (250, "max_tokens")):
        with pytest.raises(APIError) as ei:
            sp.gen_params(prompt_len, context_length=256, cap=64, prompt_param="prompt")
        assert (ei.value.param, ei.value.code) == (param, "context_length_exceeded")


def test_parse_json_and_feedback():
    from rain_adapter.serve.requests import parse_feedback, parse_json_body

    assert parse_json_body(b'{"a": 1}') == {"a": 1}
    for raw in (b"{nope", b"[1]", b"\xff"):
        with pytest.raises(APIError) as ei:
            parse_json_body(raw)
        assert (ei.value.status, ei.value.code) == (400, "invalid_json")
    fb = parse_feedback({"request_id": "r1", "score": 4, "comment": "good"})
    assert (fb.request_id, fb.score, fb.comment) == ("r1", 4.0, "good")
    for body, param in (({"score": 1}, "request_id"), ({"request_id": "r"}, "score"),
                        ({"request_id": "r", "score": "x"}, "score"),
                        ({"request_id": "r", "score": 1, "comment": 3}, "comment")):
        with pytest.raises(APIError) as ei:
            parse_feedback(body)
        assert (ei.value.status, ei.value.param) == (400, param)


def test_arm_choice_precedence():
    asg = ArmAssigner([Arm("a", 0.0, 1.0), Arm("b", 1.5, 1.0)])
    # an explicit λ is its own arm per value (the parser refuses rain_arm together with rain_lambda)
    assert asg.choose(None, 0.25, "u") == ("λ=0.25", 0.25, "explicit_lambda")
    assert asg.choose(None, 0.6, None) == ("λ=0.6", 0.6, "explicit_lambda")
    assert asg.choose("b", None, "u") == ("b", 1.5, "explicit_arm")
    name, lam, how = asg.choose(None, None, "u")
    assert how == "sticky" and lam == asg.by_name[name].lam


# ----------------------------------------------------------------------------- scheduler protocol
def test_both_schedulers_implement_the_protocol():
    """The dynamic and the continuous scheduler are Schedulers; built but never started, stop is clean."""
    import torch

    from rain_adapter import RainAdapter, RainConfig
    from rain_adapter.serve.batching import BatchScheduler
    from rain_adapter.serve.continuous import ContinuousScheduler
    from rain_adapter.serve.scheduler import Scheduler, SchedulerHealth
    from rain_adapter.serve.scheduler_factory import make_scheduler
    from rain_adapter.testing.fixtures import make_tokenizer
    from rain_adapter.testing.tiny import random_deltas, tiny_model

    torch.manual_seed(0)
    m = tiny_model("qwen2", seed=0, attn_implementation="sdpa").eval()
    cfg = RainConfig(base_model_name_or_path="tiny", layers=[0, 1], lambda_range=[0.0, 2.0])
    rm = RainAdapter.attach(m, (cfg, random_deltas(m, scale=0.5, seed=1)), check_fingerprint=False)
    tok = make_tokenizer()
    dyn = make_scheduler("dynamic", rm, tok, max_batch_size=2, batch_window_ms=0)
    cont = make_scheduler("continuous", rm, tok, max_batch_size=2, batch_window_ms=0)
    assert isinstance(dyn, BatchScheduler) and isinstance(cont, ContinuousScheduler)
    for s in (dyn, cont):
        assert isinstance(s, Scheduler)
        assert s.health() == SchedulerHealth(queue_depth=0, busy=False, accepting=False)
        s.stop(timeout=5)
    assert not isinstance(object(), Scheduler)
    with pytest.raises(ValueError, match="batching"):
        make_scheduler("static", rm, tok, max_batch_size=2, batch_window_ms=0)


def test_dynamic_scheduler_runs_a_job_and_cancels():
    """start / submit / cancel / stop through the protocol on a tiny model (no HTTP)."""
    import torch

    from rain_adapter.serve.batching import BatchScheduler
    from rain_adapter.serve.scheduler import GenJob, GenParams
    from rain_adapter.testing.fixtures import make_tokenizer
    from rain_adapter.testing.tiny import tiny_model

    torch.manual_seed(0)
    tok = make_tokenizer()
    sched = BatchScheduler(tiny_model("qwen2", seed=0).eval(), tok, max_batch_size=2, batch_window_ms=0)

    async def run():
        loop = asyncio.get_running_loop()
        live = GenJob("live", [5, 6, 7], 0.0, GenParams(max_tokens=3, temperature=0.0), loop, asyncio.Queue())
        gone = GenJob("gone", [5, 6], 0.0, GenParams(max_tokens=3, temperature=0.0), loop, asyncio.Queue())
        sched.cancel(gone)  # cancelled before it is taken: it ends without generating
        sched.submit(gone)
        sched.submit(live)
        sched.start()
        assert sched.health().accepting
        evs = {}
        for job in (gone, live):
            evs[job.job_id] = []
            while not evs[job.job_id] or evs[job.job_id][-1].kind not in ("done", "error"):
                evs[job.job_id].append(await job.events.get())
        return evs

    try:
        evs = asyncio.run(run())
    finally:
        sched.stop(timeout=30)
    assert [e.finish_reason for e in evs["gone"]] == ["cancelled"]
    assert evs["live"][-1].kind == "done" and evs["live"][-1].finish_reason in ("stop", "length")
    assert not sched.health().accepting
    with pytest.raises(RuntimeError, match="shutting down"):
        sched.submit(GenJob("late", [1], 0.0, GenParams(max_tokens=1), None, None))


def test_row_tracker_stops_and_holds_back_partial_stop():
    """Per-row streaming: stop strings end only their row; partial matches are not emitted early."""
    from rain_adapter.serve.batching import GenJob, GenParams, _RowState, _RowTracker
    from rain_adapter.testing.fixtures import make_tokenizer

    tok = make_tokenizer()
    loop = asyncio.new_event_loop()
    try:
        jobs = [GenJob("a", [1], 0.0, GenParams(max_tokens=50, stop=("END",)), loop, asyncio.Queue()),
                GenJob("b", [1], 1.0, GenParams(max_tokens=3), loop, asyncio.Queue())]
        eos = {tok.eos_token_id}
        rows = [_RowState(j, tok, eos | {tok.pad_token_id}, eos) for j in jobs]
        tr = _RowTracker(rows)
        import torch

        text_a = "hi ENDx"
        seq = [tok(c, add_special_tokens=False)["input_ids"][0] for c in text_a]
        done = None
        for step, t in enumerate(seq):
            ids = torch.tensor([[t], [seq[min(step, 2)]]])
            done = tr(ids)
            if done.all():
                break
        loop.run_until_complete(asyncio.sleep(0))
        evs_a = [jobs[0].events.get_nowait() for _ in range(jobs[0].events.qsize())]
        evs_b = [jobs[1].events.get_nowait() for _ in range(jobs[1].events.qsize())]
    finally:
        loop.close()
    assert "".join(e.text for e in evs_a if e.kind == "delta") == "hi "
    assert evs_a[-1].kind == "done" and evs_a[-1].finish_reason == "stop"
    assert evs_a[-1].stop_reason == "END"  # vLLM's stop_reason: the matched stop string
    assert evs_b[-1].finish_reason == "length" and evs_b[-1].completion_tokens == 3
    assert evs_b[-1].stop_reason is None
    assert done.tolist() == [True, True]


def test_ab_report_cli(tmp_path):
    db = MetricsDB(tmp_path / "log.sqlite")
    for r in _rows(40):
        db.log_request(r)
    db.close()
    out = subprocess.run([sys.executable, "-m", "rain_adapter.cli.serve", "ab", "report", "--db",
                          str(tmp_path / "log.sqlite"), "--png", str(tmp_path / "r.png"), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert set(rep["arms"]) == {"a", "b"} and (tmp_path / "r.png").exists()
    missing = subprocess.run([sys.executable, "-m", "rain_adapter.cli.serve", "ab", "report", "--db",
                              str(tmp_path / "none.sqlite")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no request log" in missing.stderr
