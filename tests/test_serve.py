"""`rain serve` end to end: a tiny Qwen2 + random adapter behind the real HTTP server, driven by the
official `openai` client on 127.0.0.1 (random free port, readiness by polling /health)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import sqlite3
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

from rain_adapter.serve.app import create_app, serve_state_from  # noqa: E402
from rain_adapter.serve.arms import Arm  # noqa: E402
from rain_adapter.cli.serve import load_served_model  # noqa: E402
from rain_adapter.testing.server import ServerThread  # noqa: E402
from rain_adapter.testing.serve_tiny import build_tiny_serving  # noqa: E402

KEY = "test-key"
MODEL = "tiny-rain"
CAP = 48
ARMS = [Arm("low", 0.0, 1.0), Arm("high", 1.5, 1.0)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir, adapter_dir = build_tiny_serving(root)
    return root, model_dir, adapter_dir


@pytest.fixture(scope="module")
def server(assets):
    root, model_dir, adapter_dir = assets
    model, tok = load_served_model(str(model_dir), str(adapter_dir), device="cpu", dtype="float32")
    state = serve_state_from(model, tok, model_name=MODEL, db_path=root / "log.sqlite", arms=ARMS, api_key=KEY,
                             max_tokens_cap=CAP, max_batch_size=8, batch_window_ms=60.0, context_length=256,
                             reasoning_parser="none")  # whole chat text compared; split: test_serve_reasoning
    srv = ServerThread(create_app(state)).start()
    yield srv, state, tok
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    srv, _, _ = server
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _chat(client, content, lam=None, max_tokens=12, **kw):
    extra = dict(kw.pop("extra_body", {}))
    if lam is not None:
        extra["rain_lambda"] = lam
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          max_tokens=max_tokens, temperature=0, extra_body=extra, **kw)


def test_models_and_health(server, client):
    srv, state, _ = server
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]
    h = httpx.get(srv.base_url + "/health").json()
    assert h["status"] == "ok"


def test_chat_completions_and_arm_header(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=10, temperature=0,
        user="alice")
    r = raw.parse()
    assert raw.headers["x-rain-arm"] in {"low", "high"}
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 10 and r.usage.prompt_tokens > 0
    rain = r.model_extra["rain"]
    assert rain["arm"] == raw.headers["x-rain-arm"]
    assert rain["lambda"] == {"low": 0.0, "high": 1.5}[rain["arm"]]
    # sticky: the same user always gets the same arm
    again = _chat(client, "Another question", user="alice", max_tokens=2)
    assert again.model_extra["rain"]["arm"] == rain["arm"]


def test_explicit_arm_and_lambda(client):
    r = _chat(client, "x", max_tokens=2, extra_body={"rain_arm": "high"})
    assert (r.model_extra["rain"]["arm"], r.model_extra["rain"]["lambda"]) == ("high", 1.5)
    r = _chat(client, "x", lam=0.25, max_tokens=2)
    assert (r.model_extra["rain"]["arm"], r.model_extra["rain"]["lambda"]) == ("λ=0.25", 0.25)


def test_completions_and_streaming_match(client):
    full = client.completions.create(model=MODEL, prompt="The answer is", max_tokens=12, temperature=0,
                                     extra_body={"rain_lambda": 1.0})
    assert full.object == "text_completion"
    stream = client.completions.create(model=MODEL, prompt="The answer is", max_tokens=12, temperature=0,
                                       extra_body={"rain_lambda": 1.0}, stream=True)
    text, reasons = "", []
    for ch in stream:
        text += ch.choices[0].text
        reasons.append(ch.choices[0].finish_reason)
    assert text == full.choices[0].text
    assert reasons[-1] == full.choices[0].finish_reason

    chat_full = _chat(client, "Stream me", lam=0.5)
    chunks = list(_chat(client, "Stream me", lam=0.5, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat_full.usage.completion_tokens
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat_full.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == chat_full.choices[0].finish_reason
    assert chunks[0].model_extra["rain"]["lambda"] == 0.5


def test_sampling_with_seed_is_reproducible(client):
    def sample():
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Pick a word"}], max_tokens=10, temperature=0.9,
            top_p=0.95, seed=123, extra_body={"rain_lambda": 1.0}).choices[0].message.content

    assert sample() == sample()


def test_stop_string_ends_the_answer(client):
    full = _chat(client, "Count", lam=1.0, max_tokens=16).choices[0].message.content
    cands = [full[i:i + 2] for i in range(2, len(full) - 1)
             if all(c.isascii() and c.isprintable() for c in full[i:i + 2])]
    if not cands:
        pytest.skip("random tiny model produced no printable two-character stop string")
    stop = cands[0]
    r = _chat(client, "Count", lam=1.0, max_tokens=16, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)]


def _bare_greedy(model_dir, tok, content, max_new):
    from transformers import AutoModelForCausalLM

    bare = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                   tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = bare.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = [t for t in out[0, ids.shape[1]:].tolist() if t not in (tok.eos_token_id, tok.pad_token_id)]
    return tok.decode(new, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_lambda_zero_is_bare_lrm(assets, server, client):
    _, model_dir, _ = assets
    _, _, tok = server
    prompt = "What is two plus two?"
    got = _chat(client, prompt, lam=0.0, max_tokens=16).choices[0].message.content
    assert got == _bare_greedy(model_dir, tok, prompt, 16)
    # and λ = 1.5 changes the output (the adapter is live)
    assert _chat(client, prompt, lam=1.5, max_tokens=16).choices[0].message.content != got


def test_concurrent_mixed_lambda_equals_serial(server, client):
    _, state, _ = server
    jobs = [("Hello there", 0.0), ("A much longer prompt about cats", 0.5), ("Hi", 1.0),
            ("Tell me", 2.0), ("Hello there", 1.5), ("Numbers: 1 2 3", 0.25)]
    serial = [_chat(client, p, lam=l).choices[0].message.content for p, l in jobs]
    assert len(set(serial)) > 1
    barrier = threading.Barrier(len(jobs))

    def one(job):
        barrier.wait()
        r = _chat(client, job[0], lam=job[1])
        return r.choices[0].message.content, r.model_extra["rain"]["request_id"]

    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        results = list(ex.map(one, jobs))
    assert [t for t, _ in results] == serial
    # they really shared generate calls
    con = sqlite3.connect(state.db.path)
    sizes = [con.execute("SELECT batch_size FROM requests WHERE id=?", (rid,)).fetchone()[0] for _, rid in results]
    con.close()
    assert max(sizes) > 1, sizes


def _post(srv, path, body, key=KEY, raw=None):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(srv.base_url + path, content=raw if raw is not None else json.dumps(body), headers=headers,
                      timeout=60)


BAD = [
    # (body or raw, key, status, code, words in message)
    (dict(raw=b"{not json"), KEY, 400, "invalid_json", "JSON"),
    (dict(body={"model": "nope", "messages": [{"role": "user", "content": "x"}]}), KEY, 404, "model_not_found",
     "nope"),
    (dict(body={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "rain_lambda": 5}), KEY, 400,
     "lambda_out_of_range", "lambda_range"),
    (dict(body={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "rain_lambda": "high"}), KEY, 400,
     "invalid_value", "number"),
    (dict(body={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": CAP + 1}), KEY, 400,
     "max_tokens_exceeded", "cap"),
    (dict(body={"model": MODEL, "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 4}), KEY, 400,
     "context_length_exceeded", "context"),
    (dict(body={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}), None, 401, "invalid_api_key",
     "API key"),
    (dict(body={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}), "wrong", 401, "invalid_api_key",
     "API key"),
    (dict(body={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "rain_arm": "zzz"}), KEY, 400,
     "invalid_value", "rain_arm"),
    (dict(body={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -1}), KEY, 400,
     "invalid_value", "temperature"),
    (dict(body={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                "rain_checks": [{"instruction_id": "no:such_check"}]}), KEY, 400, "invalid_value", "rain_checks"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[3] + str(i) for i, b in enumerate(BAD)])
def test_bad_inputs_get_openai_errors(server, client, case):
    srv, _, _ = server
    req, key, status, code, words = case
    r = _post(srv, "/v1/chat/completions", req.get("body"), key=key, raw=req.get("raw"))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code", "rain_code"}
    # vLLM's shape: code is the HTTP status (an int); this server's reason is rain_code
    assert err["code"] == status and type(err["code"]) is int, err
    assert err["rain_code"] == code and words.lower() in err["message"].lower(), err
    # the server keeps serving
    assert _chat(client, "still there?", lam=1.0, max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_openai_client_raises_typed_errors(server):
    srv, _, _ = server
    bad = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as ei:
        _chat(good, "x", lam=-1)
    assert "lambda_range" in str(ei.value)


def test_feedback_checks_ab_and_metrics(server, client):
    srv, state, _ = server
    r = _chat(client, "Answer without commas", lam=0.0, max_tokens=8,
              extra_body={"rain_checks": [{"instruction_id": "punctuation:no_comma", "kwargs": {}}]})
    rain = r.model_extra["rain"]
    assert isinstance(rain["compliant"], bool) and isinstance(rain["format_valid"], bool)
    ok = _post(srv, "/v1/rain/feedback", {"request_id": rain["request_id"], "score": 4})
    assert ok.status_code == 200, ok.text
    miss = _post(srv, "/v1/rain/feedback", {"request_id": "chatcmpl-nope", "score": 1})
    assert miss.status_code == 404 and miss.json()["error"]["param"] == "request_id"
    ab = httpx.get(srv.base_url + "/v1/rain/ab", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert ab["n_total"] >= 1 and "λ=0" in ab["arms"]
    fb = ab["arms"]["λ=0"]["mean_feedback"]
    assert fb["n"] >= 1 and fb["value"] is not None
    row = sqlite3.connect(state.db.path).execute(
        "SELECT arm, lam, compliant, format_valid, prompt_tokens, completion_tokens, latency_s, ttft_s, status "
        "FROM requests WHERE id=?", (rain["request_id"],)).fetchone()
    assert row[0] == "λ=0" and row[1] == 0.0 and row[2] in (0, 1) and row[3] in (0, 1)
    assert row[4] > 0 and row[5] >= 1 and row[6] >= row[7] > 0 and row[8] == "ok"
    text = httpx.get(srv.base_url + "/metrics").text
    assert "# TYPE rain_requests_total counter" in text and 'rain_requests_total{endpoint="chat"' in text
    assert "rain_batch_size_bucket" in text


def test_graceful_shutdown_finishes_inflight(assets, tmp_path):
    _, model_dir, adapter_dir = assets
    model, tok = load_served_model(str(model_dir), str(adapter_dir), device="cpu", dtype="float32")
    state = serve_state_from(model, tok, model_name=MODEL, db_path=tmp_path / "g.sqlite", max_tokens_cap=CAP,
                             batch_window_ms=0)
    srv = ServerThread(create_app(state)).start()
    c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    started = threading.Event()
    out = {}

    def call():
        started.set()
        out["r"] = _chat(c, "finish me", lam=1.0, max_tokens=CAP)

    t = threading.Thread(target=call)
    t.start()
    started.wait()
    # poll until the request is inside the server, then ask the server to exit
    for _ in range(4000):
        if state.inflight > 0:
            break
        threading.Event().wait(0.005)
    srv.stop()
    t.join(60)
    r = out["r"]
    assert r.choices[0].finish_reason in ("stop", "length")
    con = sqlite3.connect(tmp_path / "g.sqlite")
    assert con.execute("SELECT status FROM requests WHERE id=?",
                       (r.model_extra["rain"]["request_id"],)).fetchone() == ("ok",)
