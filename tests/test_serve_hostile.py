"""Nothing a client sends runs away with the server (issue 22: 1, 2 and the 500s of 7): a chat template
from a request is a 400 unless the operator trusts them, every template renders with bounds on time
and size, /tokenize and /detokenize have generation's limits, a catastrophic regex in rain_checks is
unscored, deep JSON and a huge seed are 400s, and the response headers are plain ASCII. Each hostile
case ends within about a second, and the server stays healthy."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from rain_adapter.serve.app import create_app  # noqa: E402
from rain_adapter.serve.arms import Arm  # noqa: E402
from rain_adapter.serve.scheduler import GenEvent, SchedulerHealth  # noqa: E402
from rain_adapter.serve.templates import TemplateLimits, TemplateRefused, render_chat  # noqa: E402
from rain_adapter.testing.fixtures import make_tokenizer  # noqa: E402
from rain_adapter.testing.server import ServerThread  # noqa: E402

M = "tiny"
BOMB = "{{ 'x' * 1500000000 }}"  # the issue's 130-byte request: 22 GB resident before
LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
MSGS = [{"role": "user", "content": "hello"}]
#: the issue's ReDoS (catastrophic for ``re``) and one the ``regex`` engine cannot shortcut either
ISSUE_REDOS, HARD_REDOS = r"^(a+)+b$", r"^(a|aa)+$"
CANNED = "a" * 60 + "!"

# a ChatML template of the kind real models ship (namespace, reversed loop, loop.last, tojson,
# string methods, raise_exception, whitespace control), to check that the sandbox renders the same text
CHATML = """{%- if messages[0]['role'] == 'system' -%}
{{- '<|im_start|>system\\n' + messages[0]['content'] | trim + '<|im_end|>\\n' -}}
{%- else -%}{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' -}}{%- endif -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages[::-1] -%}{%- if ns.last_user == -1 and m.role == 'user' -%}
{%- set ns.last_user = messages|length - 1 - loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
{%- if m.role not in ['system', 'user', 'assistant'] -%}{{ raise_exception('bad role ' ~ m.role) }}{%- endif -%}
{%- if m.role != 'system' or not loop.first -%}
{%- set content = m.content.split('</think>')[-1].lstrip('\\n') if m.role == 'assistant' else m.content -%}
{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>' + ('\\n' if not loop.last else '') -}}
{%- endif -%}{%- endfor -%}
{%- if add_generation_prompt -%}{{- '\\n<|im_start|>assistant\\n' -}}{%- endif -%}
{{- '' if ns.last_user >= 0 else ({'n': 1}|tojson) -}}"""


def _server(tiny_serving, name, **kw):
    kw = {"max_tokens_cap": 16, "context_length": 256, "arms": [Arm("a", 0.0)], **kw}
    state = tiny_serving.state(name, model_name=M, **kw)
    return ServerThread(create_app(state)).start(), state


@pytest.fixture(scope="module")
def plain(tiny_serving):
    srv, state = _server(tiny_serving, "plain", max_body_bytes=8 * 1024 * 1024)
    yield srv, state
    srv.stop()


@pytest.fixture(scope="module")
def trusting(tiny_serving):
    srv, state = _server(tiny_serving, "trusting", trust_request_chat_template=True)
    yield srv, state
    srv.stop()


def _post(srv, path, body, **kw):
    t0 = time.perf_counter()
    r = httpx.post(srv.base_url + path, timeout=120, **({"content": body} if isinstance(body, (bytes, str))
                                                        else {"json": body}), **kw)
    return r, time.perf_counter() - t0


def _healthy(srv) -> None:
    t0 = time.perf_counter()
    assert httpx.get(srv.base_url + "/health", timeout=30).status_code == 200
    assert time.perf_counter() - t0 < 1.0


def _chat(**extra):
    return {"model": M, "messages": MSGS, "max_tokens": 2, "temperature": 0, **extra}


# ----------------------------------------------------------------------------- templates
@pytest.mark.parametrize("where,template", [("chat_template_kwargs", BOMB), ("chat_template", LOOP),
                                            ("chat_template_kwargs", LOOP), ("chat_template", BOMB)])
def test_a_request_template_is_a_400_without_the_opt_in(plain, where, template):
    srv, _ = plain
    extra = {"chat_template_kwargs": {"chat_template": template}} if where == "chat_template_kwargs" else \
        {"chat_template": template}
    for path, body in (("/v1/chat/completions", _chat(**extra)), ("/tokenize", {"messages": MSGS, **extra})):
        r, dt = _post(srv, path, body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == where and err["rain_code"] == "chat_template_not_allowed"
        assert "--trust-request-chat-template" in err["message"]
        assert dt < 1.0
    _healthy(srv)


@pytest.mark.parametrize("template,words", [(BOMB, "builds a string of 1500000000 characters"),
                                            (LOOP, "ran over 0.5 s"),
                                            ("{{ 'x'|center(1000000000) }}", "|center"),
                                            ("{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}", "recursed"),
                                            ("{{ raise_exception('no') }}", "TemplateError: no"),
                                            ("{% for x in %}", "TemplateSyntaxError")])
def test_with_the_opt_in_a_hostile_template_is_a_quick_400(trusting, template, words):
    srv, _ = trusting
    for path, body in (("/v1/chat/completions", _chat(chat_template_kwargs={"chat_template": template})),
                       ("/tokenize", {"messages": MSGS, "chat_template": template})):
        r, dt = _post(srv, path, body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "chat_template" and err["rain_code"] == "chat_template_failed" and words in err["message"]
        assert dt < 1.5  # the loop runs 0.5 s, then answers
    _healthy(srv)


def test_with_the_opt_in_a_request_template_is_used(trusting):
    srv, state = trusting
    r, _ = _post(srv, "/tokenize", {"messages": MSGS, "add_generation_prompt": False,
                                    "chat_template": "{% for m in messages %}[{{ m.content }}]{% endfor %}"})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == state.tokenizer("[hello]", add_special_tokens=False)["input_ids"]
    r, _ = _post(srv, "/v1/chat/completions", _chat(chat_template="{{ messages[0].content }}"))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len("hello")
    r, _ = _post(srv, "/v1/chat/completions", _chat(chat_template="x" * (128 * 1024 + 1)))
    assert r.status_code == 400 and r.json()["error"]["rain_code"] == "chat_template_too_long"


@pytest.mark.parametrize("template", [None, CHATML])
@pytest.mark.parametrize("gen", [True, False])
def test_the_sandbox_renders_what_transformers_renders(template, gen):
    tok = make_tokenizer()
    convs = [MSGS, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "<think>sum</think>\n4"}, {"role": "user", "content": "and 3+3?"}]]
    for conv in convs:
        want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, chat_template=template)
        got = render_chat(tok, conv, TemplateLimits(max_chars=10_000), chat_template=template,
                          add_generation_prompt=gen)
        assert got == want
    with pytest.raises(TemplateRefused, match="builds a (string|text) of 2[0-9]{4} characters; at most 10000"):
        render_chat(tok, [{"role": "user", "content": "y" * 20_000}], TemplateLimits(max_chars=10_000),
                    chat_template=template)


def test_the_model_template_is_bounded_too(tiny_serving):
    """A model whose own template runs away (here: a loop) gets a 400 per request, not a frozen server."""
    srv, state = _server(tiny_serving, "own-loop")
    try:
        state.tokenizer.chat_template = LOOP + "{{ messages[0].content }}"
        r, dt = _post(srv, "/v1/chat/completions", _chat())
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert "ran over 0.5 s" in r.json()["error"]["message"] and dt < 1.5
        _healthy(srv)
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- /tokenize, /detokenize
def test_tokenize_a_4mb_prompt_is_a_quick_4xx(plain):
    srv, state = plain
    r, dt = _post(srv, "/tokenize", {"model": M, "prompt": "word " * 800_000})  # 4 MB, under --max-body-bytes
    assert r.status_code == 400 and r.json()["error"]["rain_code"] == "context_length_exceeded", r.text
    assert dt < 1.0
    r, dt = _post(srv, "/tokenize", {"messages": [{"role": "user", "content": "word " * 800_000}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and dt < 1.0
    n = len(state.tokenizer("a" * 300)["input_ids"])  # 1 byte, 1 token (and a BOS): over the 256 context
    r, _ = _post(srv, "/tokenize", {"prompt": "a" * 300})
    assert r.status_code == 400 and f"has {n} tokens" in r.json()["error"]["message"]
    r, dt = _post(srv, "/detokenize", {"tokens": [65] * 100_000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens" and dt < 1.0
    ok, _ = _post(srv, "/tokenize", {"prompt": "hello"})
    assert ok.status_code == 200 and ok.json()["tokens"] == state.tokenizer("hello")["input_ids"]
    _healthy(srv)


# ----------------------------------------------------------------------------- regexes in rain_checks
class CannedScheduler:
    """Answers every job with :data:`CANNED` (so a check sees a chosen text)."""

    def start(self):
        return self

    def submit(self, job):
        job.t_first_token = time.perf_counter()
        job.n_generated = 5
        job.emit(GenEvent("delta", text=CANNED, t=time.perf_counter()))
        job.emit(GenEvent("done", finish_reason="stop", completion_tokens=5, t=time.perf_counter()))

    def cancel(self, job):
        pass

    def stop(self, timeout=60.0):
        pass

    def health(self):
        return SchedulerHealth(0, False, True)


def test_a_catastrophic_regex_in_rain_checks_is_unscored_quickly(tiny_serving):
    srv, state = _server(tiny_serving, "redos", scheduler=CannedScheduler())
    try:
        checks = [{"instruction_id": "spec:regex", "kwargs": {"pattern": p, "where": "response"}}
                  for p in (HARD_REDOS, ISSUE_REDOS)]
        r, dt = _post(srv, "/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 5, "rain_checks": checks})
        assert r.status_code == 200, r.text
        assert dt < 1.5  # one timeout (0.25 s) and one quick search
        _healthy(srv)
        row = sqlite3.connect(state.db.path).execute("SELECT checks_json, unscored FROM requests WHERE id=?",
                                                     (r.json()["rain"]["request_id"],)).fetchone()
        hard, issue = json.loads(row[0])
        assert hard["ok"] is None and "RegexTimeout" in hard["error"] and row[1] == 1
        assert issue["ok"] is False
        r, _ = _post(srv, "/v1/completions", {"model": M, "prompt": "hi", "rain_checks": [
            {"instruction_id": "spec:regex", "kwargs": {"pattern": "(?:a{1000}){1000}"}}]})
        assert r.status_code == 400 and "rain_checks[0]: spec:regex: kwargs.pattern" in r.json()["error"]["message"]
        many = [{"instruction_id": "spec:regex", "kwargs": {"pattern": HARD_REDOS}}] * 33
        r, dt = _post(srv, "/v1/completions", {"model": M, "prompt": "hi", "rain_checks": many})
        assert r.status_code == 400 and "at most 32 rain_checks" in r.json()["error"]["message"] and dt < 1.0
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- deep JSON, huge seeds
def test_deep_json_is_a_400(plain):
    srv, _ = plain
    for depth in (100_000, 65):
        raw = '{"model": "tiny", "prompt": ' + "[" * depth + "]" * depth + "}"
        for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/v1/rain/feedback"):
            r, dt = _post(srv, path, raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (path, depth, r.text)
            assert r.json()["error"]["rain_code"] == "invalid_json" and "nested more than 64" in r.json()["error"]["message"]
            assert dt < 1.0
    _healthy(srv)


@pytest.mark.parametrize("seed", [2 ** 64, 2 ** 63, -(2 ** 63) - 1, 10 ** 30])
def test_a_seed_outside_64_bits_is_a_400(plain, seed):
    srv, _ = plain
    r, _ = _post(srv, "/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 2, "seed": seed})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    ok, _ = _post(srv, "/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 2, "seed": 2 ** 63 - 1})
    assert ok.status_code == 200, ok.text


# ----------------------------------------------------------------------------- headers
def test_headers_are_plain_ascii_and_the_arm_name_is_in_the_body(tiny_serving):
    srv, _ = _server(tiny_serving, "arms", arms=[Arm("λ=0.6", 0.6), Arm("plain", 1.0)])
    try:
        for arm, stream in (("λ=0.6", False), ("plain", False), ("λ=0.6", True)):
            body = {"model": M, "prompt": "hi", "max_tokens": 2, "rain_arm": arm, "stream": stream}
            with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=60) as r:
                assert r.status_code == 200
                raw = r.headers.raw
                text = r.read().decode()
            for k, v in raw:
                v.decode("ascii")
                assert b"%" not in v, (k, v)  # nothing percent-encoded
            headers = {k.decode().lower(): v.decode() for k, v in raw}
            assert float(headers["x-rain-lambda"]) == (0.6 if arm != "plain" else 1.0)
            assert headers.get("x-rain-arm") == ("plain" if arm == "plain" else None)
            assert f'"arm": "{arm}"' in text or f'"arm":"{arm}"' in text or json.dumps(arm) in text
    finally:
        srv.stop()
