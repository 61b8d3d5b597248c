"""`n > 1` and lists of prompts (serve/choices.py), in both batching modes: n choices indexed 0..n-1
(prompt_index·n + k with several prompts), greedy choices identical, seeded choices reproducible,
usage over all choices, streaming chunks tagged with their index, one log row per choice, caps."""

from __future__ import annotations

import json
import sqlite3

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from rain_adapter.serve.app import create_app  # noqa: E402
from rain_adapter.serve.choices import choice_seed  # noqa: E402
from rain_adapter.testing.server import ServerThread  # noqa: E402

M = "tiny"


@pytest.fixture(scope="module", params=["dynamic", "continuous"])
def served(tiny_serving, request):
    state = tiny_serving.state(request.param, model_name=M, max_tokens_cap=16, context_length=256,
                               batching=request.param, reasoning_parser="none")  # chat text compared whole; the split: test_serve_reasoning
    srv = ServerThread(create_app(state)).start()
    yield srv, state
    srv.stop()


def _post(srv, path, body):
    return httpx.post(srv.base_url + path, json=body, timeout=120)


def _ok(srv, path, body):
    r = _post(srv, path, body)
    assert r.status_code == 200, r.text
    return r.json()


def _texts(j):
    return [c["message"]["content"] if "message" in c else c["text"] for c in j["choices"]]


CHAT = {"model": M, "messages": [{"role": "user", "content": "Name a colour"}], "max_tokens": 8,
        "rain_lambda": 1.0}
COMP = {"model": M, "prompt": "Once upon", "max_tokens": 8, "rain_lambda": 1.0}


@pytest.mark.parametrize("path,base", [("/v1/chat/completions", CHAT), ("/v1/completions", COMP)])
def test_n3_greedy_choices_are_identical_and_logged_per_choice(served, path, base):
    srv, state = served
    solo = _ok(srv, path, {**base, "temperature": 0})
    j = _ok(srv, path, {**base, "temperature": 0, "n": 3})
    assert [c["index"] for c in j["choices"]] == [0, 1, 2]
    assert _texts(j) == _texts(solo) * 3
    u = j["usage"]
    assert u["prompt_tokens"] == solo["usage"]["prompt_tokens"]  # the prompt counts once
    assert u["completion_tokens"] == 3 * solo["usage"]["completion_tokens"]
    rid = j["id"]
    assert j["rain"]["request_id"] == rid and j["rain"]["n_choices"] == 3
    ids = [c["rain"]["request_id"] for c in j["choices"]]
    assert ids == [rid, f"{rid}-1", f"{rid}-2"]
    con = sqlite3.connect(state.db.path)
    try:
        rows = con.execute(f"SELECT id, n_choices, choice_index, status, completion_tokens FROM requests "
                           f"WHERE id IN ({','.join('?' * 3)}) ORDER BY choice_index", ids).fetchall()
    finally:
        con.close()
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [(i, 3, k, "ok") for k, i in enumerate(ids)]
    assert sum(r[4] for r in rows) == u["completion_tokens"]
    # feedback goes to a choice's row
    fb = _post(srv, "/v1/rain/feedback", {"request_id": ids[2], "score": 1})
    assert fb.status_code == 200, fb.text


def test_n3_seeded_sampling_is_reproducible(served):
    srv, _ = served
    body = {**COMP, "temperature": 1.0, "seed": 7, "n": 3, "max_tokens": 10}
    a, b = _ok(srv, "/v1/completions", body), _ok(srv, "/v1/completions", body)
    assert _texts(a) == _texts(b)
    assert len(set(_texts(a))) > 1  # derived seeds: the choices differ
    # choice 0 uses the request's seed, choice j the derived one: each equals a solo request with that seed
    solo = [_texts(_ok(srv, "/v1/completions", {**body, "n": 1, "seed": choice_seed(7, j)}))[0] for j in range(3)]
    assert solo == _texts(a)


def test_prompt_list_gives_one_choice_per_prompt_equal_to_solo(served):
    srv, state = served
    prompts = ["Once upon", "Tell me a story"]
    base = {**COMP, "temperature": 0}
    solo = [_texts(_ok(srv, "/v1/completions", {**base, "prompt": p}))[0] for p in prompts]
    j = _ok(srv, "/v1/completions", {**base, "prompt": prompts})
    assert [c["index"] for c in j["choices"]] == [0, 1] and _texts(j) == solo
    ids = [state.tokenizer(p)["input_ids"] for p in prompts]
    assert j["usage"]["prompt_tokens"] == sum(map(len, ids))
    assert _texts(_ok(srv, "/v1/completions", {**base, "prompt": ids})) == solo
    # × n: index = prompt_index·n + k
    j2 = _ok(srv, "/v1/completions", {**base, "prompt": prompts, "n": 2})
    assert [c["index"] for c in j2["choices"]] == [0, 1, 2, 3]
    assert _texts(j2) == [solo[0], solo[0], solo[1], solo[1]]


def _sse(srv, path, body):
    out = []
    with httpx.stream("POST", srv.base_url + path, json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
    assert out[-1] == "[DONE]"
    return [json.loads(x) for x in out[:-1]]


def test_streaming_with_several_choices_tags_each_chunk(served):
    srv, _ = served
    body = {**COMP, "temperature": 0, "prompt": ["Once upon", "Tell me a story"], "n": 2}
    full = _ok(srv, "/v1/completions", body)
    chunks = _sse(srv, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    texts = {}
    for c in chunks[:-1]:
        assert c["id"] == chunks[0]["id"]
        (ch,) = c["choices"]
        texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
    assert [texts[i] for i in range(4)] == _texts(full)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    chat = _sse(srv, "/v1/chat/completions", {**CHAT, "temperature": 0, "n": 2, "stream": True})
    got = {0: "", 1: ""}
    finished = set()
    for c in chat:
        (ch,) = c["choices"]
        got[ch["index"]] += ch["delta"].get("content", "")
        if ch["finish_reason"]:
            finished.add(ch["index"])
    assert finished == {0, 1} and got[0] == got[1] == _texts(_ok(srv, "/v1/chat/completions",
                                                                  {**CHAT, "temperature": 0}))[0]


@pytest.mark.parametrize("patch,param", [({"n": 17}, "n"), ({"n": 0}, "n"), ({"prompt": ["a"] * 65}, "prompt"),
                                         ({"prompt": ["a"] * 10, "n": 16}, "n"), ({"prompt": ["a", [1, 2]]}, "prompt"),
                                         ({"prompt": ["a", ""]}, "prompt")])
def test_caps_on_choices_are_400_naming_the_field(served, patch, param):
    srv, _ = served
    r = _post(srv, "/v1/completions", {**COMP, **patch})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_one_failed_choice_cancels_the_others_and_is_a_500():
    """No server: choice 1 fails, choice 0 is cancelled by it; rows error / cancelled; a 500 raised."""
    import asyncio

    from rain_adapter.serve.choices import ChoiceSet, reply_choices
    from rain_adapter.serve.errors import APIError
    from rain_adapter.serve.requests import RequestLimits, parse_completion
    from rain_adapter.serve.responses import Exchange
    from rain_adapter.serve.scheduler import GenEvent, GenJob, GenParams

    class Log:
        rows: list = []

        async def finish(self, ex, text, done, status, reason=None, http_status=None):
            row = dict(id=ex.rid, status=status, text=text, reason=reason, http_status=http_status)
            self.rows.append(row)
            return row

    async def main():
        req = parse_completion({"model": "m", "prompt": "x", "n": 2}, RequestLimits("m", (0.0, 1.0), frozenset(), 8))
        q, tagged = ChoiceSet.shared_events(2)
        loop = asyncio.get_running_loop()
        jobs = [GenJob(f"r{'-1' if i else ''}", [1], 0.0, GenParams(max_tokens=8), loop, tagged[i]) for i in range(2)]
        released, cancelled = [], []

        def cancel(i):
            cancelled.append(i)
            if i == 0:  # the scheduler ends a cancelled job at its next step
                jobs[0].events.put_nowait(GenEvent("done", finish_reason="cancelled", completion_tokens=1))

        exs = [Exchange(request=req, job=jobs[i], model_name="m", arm="a", lam=0.0, assignment="random", created=0,
                        cancel=lambda i=i: cancel(i), release=lambda i=i: released.append(i), index=i, n_choices=2,
                        response_id="r") for i in range(2)]
        jobs[0].events.put_nowait(GenEvent("delta", text="a"))
        jobs[1].events.put_nowait(GenEvent("error", error=RuntimeError("boom")))
        try:
            await reply_choices(ChoiceSet(exs, q), Log())
        except APIError as e:
            return e, released, cancelled
        raise AssertionError("no 500")

    err, released, cancelled = asyncio.run(main())
    assert err.status == 500 and "boom" in err.message
    assert sorted(released) == [0, 1] and 0 in cancelled
    assert {r["id"]: (r["status"], r["http_status"]) for r in Log.rows} == {"r-1": ("error", 500),
                                                                          "r": ("cancelled", 500)}
    assert [r["text"] for r in Log.rows if r["id"] == "r"] == ["a"]
