"""`rain serve` never down, nothing unlogged: empty prompts, limits before work, the API key before the
body, a supervised continuous loop, a row for every request, disconnects, bounded feedback (issue 13)."""

from __future__ import annotations

import socket
import sqlite3

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from rain_adapter.serve.app import create_app  # noqa: E402
from rain_adapter.serve.arms import Arm  # noqa: E402
from rain_adapter.testing.server import ServerThread  # noqa: E402

KEY = "k"
M = "tiny"
H = {"Authorization": f"Bearer {KEY}"}
LIMIT = 100_000


def _server(tiny_serving, name, **kw):
    state = tiny_serving.state(name, model_name=M, api_key=KEY, max_tokens_cap=16, context_length=256,
                               max_body_bytes=LIMIT, arms=[Arm("a", 0.0), Arm("b", 1.0)], **kw)
    return ServerThread(create_app(state)).start(), state


@pytest.fixture(scope="module")
def dyn(tiny_serving):
    srv, state = _server(tiny_serving, "dyn")
    yield srv, state
    srv.stop()


def _post(srv, path, body, headers=H):
    return httpx.post(srv.base_url + path, json=body, headers=headers, timeout=60)


def _rows(state, where="1=1"):
    con = sqlite3.connect(state.db.path)
    try:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute(f"SELECT * FROM requests WHERE {where} ORDER BY created")]
    finally:
        con.close()


# ----------------------------------------------------------------------------- P1: never down
@pytest.mark.parametrize("prompt", ["", [], [""], [[]]])
def test_empty_prompt_is_a_400_in_dynamic_mode(dyn, prompt):
    srv, _ = dyn
    r = _post(srv, "/v1/completions", {"model": M, "prompt": prompt, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt"
    ok = _post(srv, "/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200, ok.text


def test_continuous_empty_prompt_then_normal_request_and_loop_restart(tiny_serving):
    srv, state = _server(tiny_serving, "cb", batching="continuous")
    try:
        body = {"model": M, "prompt": "", "max_tokens": 3, "temperature": 0, "rain_lambda": 1.0}  # no random arm
        r = _post(srv, "/v1/completions", body)
        assert r.status_code == 400 and r.json()["error"]["rain_code"] == "empty_prompt", r.text
        texts = []
        for temp in (0, 0.8):  # greedy (CB loop) and sampling (dynamic, loop paused) both still served
            ok = _post(srv, "/v1/completions", {**body, "prompt": "hello", "temperature": temp})
            assert ok.status_code == 200, ok.text
            texts.append(ok.json()["choices"][0]["text"])
        # a request whose step kills the CB loop fails alone with a 500 naming the reason; the loop restarts
        sched = state.scheduler

        def boom(rid):
            raise KeyError(f"injected failure for {rid}")

        sched.hook.lam_of = boom
        bad = _post(srv, "/v1/completions", {**body, "prompt": "crash"})
        assert bad.status_code == 500 and "injected failure" in bad.json()["error"]["message"], bad.text
        for _ in range(2000):  # the consumer restarts the loop; /health is 503 until then
            h = httpx.get(srv.base_url + "/health", timeout=5)
            if h.status_code == 200:
                break
            assert h.json()["status"] == "unhealthy" and h.json()["reason"]
        assert h.status_code == 200 and sched.restarts == 1
        again = [_post(srv, "/v1/completions", {**body, "prompt": "hello"}) for _ in range(2)]
        assert [a.status_code for a in again] == [200, 200]
        assert [a.json()["choices"][0]["text"] for a in again] == [texts[0]] * 2  # same greedy answer as before
        (row,) = _rows(state, "status='error'")
        assert "injected failure" in row["reason"] and row["http_status"] == 500
    finally:
        srv.stop()


def test_oversized_prompt_refused_before_tokenisation_and_health_answers(dyn):
    srv, state = dyn
    tok = state.tokenizer
    calls = []

    class Tripwire:  # the tokenizer must not be called for a prompt that cannot fit
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, *a, **k):
            calls.append("tokenize")
            raise AssertionError("tokenised an oversized prompt")

        def apply_chat_template(self, *a, **k):
            calls.append("template")
            raise AssertionError("templated an oversized prompt")

    state.tokenizer = Tripwire()
    try:
        big = "x" * (state.bytes_per_token * state.context_length + 1)
        r = _post(srv, "/v1/completions", {"model": M, "prompt": big, "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["rain_code"] == "context_length_exceeded", r.text
        r = _post(srv, "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": big}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        r = _post(srv, "/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 256})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    finally:
        state.tokenizer = tok
    assert calls == []
    assert httpx.get(srv.base_url + "/health", timeout=1).status_code == 200


def _raw(srv, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send raw HTTP (headers promising more body than sent) and read the status line and reply."""
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_no_key_huge_body_is_401_without_reading_it(dyn):
    srv, _ = dyn
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 400000000\r\n\r\n")
    status, data = _raw(srv, head, b'{"model": ')
    assert status == 401 and b"invalid_api_key" in data
    # with the key: the Content-Length alone is a 413
    status, data = _raw(srv, head.replace(b"\r\n\r\n", f"\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()), b"{")
    assert status == 413 and b"request_too_large" in data


def test_chunked_body_over_the_limit_is_413(dyn):
    srv, _ = dyn

    def gen():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(20):
            yield b"a" * 10_000
        yield b'"}'

    r = httpx.post(srv.base_url + "/v1/completions", content=gen(), headers=H, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["rain_code"] == "request_too_large"


def test_metrics_open_unless_protect_all(dyn):
    srv, state = dyn
    assert httpx.get(srv.base_url + "/metrics").status_code == 200
    assert httpx.get(srv.base_url + "/v1/models").status_code == 401
    state.protect_all = True
    try:
        for path in ("/metrics", "/openapi.json", "/docs"):
            assert httpx.get(srv.base_url + path).status_code == 401, path
        assert httpx.get(srv.base_url + "/health").status_code == 200
    finally:
        state.protect_all = False


@pytest.mark.parametrize("field,value", [("user", "u" * 300), ("stop", ["s" * 300]), ("stop", ["a"] * 17),
                                         ("user", 5), ("response_format", {"type": "json_object"}),
                                         ("tools", [{"type": "function"}])])
def test_caps_and_unsupported_fields_are_400_naming_the_field(dyn, field, value):
    srv, _ = dyn
    r = _post(srv, "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "x"}],
                                            "max_tokens": 2, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


# ----------------------------------------------------------------------------- P2: nothing unlogged
def test_bad_user_with_lambda_is_400_before_generation_and_logged(dyn):
    srv, state = dyn
    before = state.metrics.batch_size.values.get((), [0])[-1]
    r = _post(srv, "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "x"}],
                                            "rain_lambda": 0.5, "user": {"id": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "user"
    assert state.metrics.batch_size.values.get((), [0])[-1] == before  # no generate call
    both = _post(srv, "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "x"}],
                                               "rain_lambda": 0.5, "rain_arm": "a"})
    assert both.status_code == 400 and both.json()["error"]["param"] == "rain_arm"
    rej = _rows(state, "status='rejected'")
    assert any(r["reason"].startswith("user:") and r["http_status"] == 400 for r in rej)
    assert any(r["reason"].startswith("rain_arm:") for r in rej)


def test_feedback_bounded_finite_and_one_per_request(dyn):
    srv, _ = dyn
    ok = _post(srv, "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "x"}],
                                             "max_tokens": 2, "temperature": 0, "rain_lambda": 0.5})
    rid = ok.json()["rain"]["request_id"]
    assert ok.json()["rain"]["arm"] == "λ=0.5"
    for score in (1e7, -2e6, 1.7e308, -1.7e308):  # two posts of 1.7e308 once broke the report
        r = _post(srv, "/v1/rain/feedback", {"request_id": rid, "score": score})
        assert r.status_code == 400 and r.json()["error"]["param"] == "score"
    nan = httpx.post(srv.base_url + "/v1/rain/feedback", content=f'{{"request_id": "{rid}", "score": NaN}}',
                     headers={**H, "Content-Type": "application/json"})
    assert nan.status_code == 400 and nan.json()["error"]["param"] == "score"
    assert _post(srv, "/v1/rain/feedback", {"request_id": rid, "score": 1}).status_code == 200
    again = _post(srv, "/v1/rain/feedback", {"request_id": rid, "score": -1})
    assert again.status_code == 409 and again.json()["error"]["rain_code"] == "feedback_exists"
    ab = httpx.get(srv.base_url + "/v1/rain/ab", headers=H)
    assert ab.status_code == 200
    assert ab.json()["arms"]["λ=0.5"]["mean_feedback"]["value"] == 1


def test_tokenize_detokenize_and_model_card(dyn):
    srv, state = dyn
    t = _post(srv, "/tokenize", {"model": M, "prompt": "hello"}).json()
    assert t["tokens"] == list(state.tokenizer("hello")["input_ids"]) and t["max_model_len"] == 256
    assert _post(srv, "/detokenize", {"tokens": t["tokens"]}).json()["prompt"].endswith("hello")
    card = httpx.get(srv.base_url + f"/v1/models/{M}", headers=H).json()
    assert card["id"] == M and card["max_model_len"] == 256
    assert httpx.get(srv.base_url + "/v1/models/nope", headers=H).status_code == 404
