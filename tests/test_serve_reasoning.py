"""The thinking as ``reasoning_content`` (issue 22, part 6), as vLLM's ``deepseek_r1`` reasoning parser.

The splitter alone (every way of cutting a response into deltas gives the same split, ``</think>``
arriving in pieces included), then the real HTTP server driven by the ``openai`` client and by plain
HTTP: a scripted scheduler sends chosen deltas, so the markers land where the test wants them; the
R1-style template of the test tokenizer opens ``<think>`` in its generation prompt, the plain one does
not. Scoring and the log still see the full text. Last, the tiny model through the real scheduler."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from rain_adapter.serve.app import create_app, serve_state_from  # noqa: E402
from rain_adapter.serve.reasoning import (CONTENT, REASONING, ReasoningSplitter, prompt_opens_thinking,  # noqa: E402
                                          split_reasoning)
from rain_adapter.serve.scheduler import GenEvent, SchedulerHealth  # noqa: E402
from rain_adapter.testing.fixtures import PLAIN_CHAT_TEMPLATE, make_tokenizer  # noqa: E402
from rain_adapter.testing.server import ServerThread  # noqa: E402

M = "r1"
WAIT = 60.0
#: an R1 response after a generation prompt that opened <think>: </think> arrives in three pieces
R1_DELTAS = ["Let me", " think.</", "thi", "nk>\n\nThe ans", "wer is 4."]
R1_TEXT = "".join(R1_DELTAS)


# ----------------------------------------------------------------------------- the splitter
def _split_by_feeding(text, cuts, inside):
    s = ReasoningSplitter(inside)
    pieces, prev = [], 0
    for c in list(cuts) + [len(text)]:
        pieces += s.feed(text[prev:c])
        prev = c
    pieces += s.flush()
    return pieces


@pytest.mark.parametrize("text,inside,want", [
    ("Let me see</think>\n\nanswer", True, ("Let me see", "\n\nanswer")),
    ("cut off while thinking", True, ("cut off while thinking", None)),          # as vLLM: content None
    ("x</think>", True, ("x", None)),
    ("plain answer", False, (None, "plain answer")),                             # no thinking block at all
    ("<think>\nhmm</think>\n\nok", False, ("\nhmm", "\n\nok")),                  # Qwen3: the model opens it
    ("a</think>b", False, (None, "a</think>b")),                                 # no opening: stays content
    ("r</think>a <think> b </think> c", True, ("r", "a <think> b </think> c")),  # after the first: content
    ("a <thin k</th </think>z", True, ("a <thin k</th ", "z")),                  # marker look-alikes
])
def test_split_is_the_same_however_the_text_is_cut(text, inside, want):
    assert split_reasoning(text, inside) == want
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            pieces = _split_by_feeding(text, (i, j), inside)
            assert all(t for _, t in pieces)  # never an empty piece
            fields = [f for f, _ in pieces]
            if inside:  # reasoning first, then content: never back
                assert fields == sorted(fields, key=lambda f: f == CONTENT)
            r = "".join(t for f, t in pieces if f == REASONING)
            c = "".join(t for f, t in pieces if f == CONTENT)
            assert (r or None, c or None) == (want[0] or None, want[1] or None), (i, j)


def test_a_marker_start_is_held_back_until_decided():
    s = ReasoningSplitter(True)
    assert s.feed("abc</") == [(REASONING, "abc")]
    assert s.feed("th") == [] and s.feed("ink") == []
    assert s.feed(">x") == [(CONTENT, "x")]
    s = ReasoningSplitter(True)
    assert s.feed("a</th") == [(REASONING, "a")] and s.flush() == [(REASONING, "</th")]


def test_prompt_opens_thinking_from_the_template():
    msgs = [{"role": "user", "content": "hi"}]
    r1, plain = make_tokenizer(), make_tokenizer(chat_template=PLAIN_CHAT_TEMPLATE)
    ids = r1.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt_opens_thinking(r1, r1(ids, add_special_tokens=False)["input_ids"])
    ids = plain.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert not prompt_opens_thinking(plain, plain(ids, add_special_tokens=False)["input_ids"])
    assert not prompt_opens_thinking(r1, r1("a </think> <think> b", add_special_tokens=False)["input_ids"])
    assert not prompt_opens_thinking(None, [1, 2])


# ----------------------------------------------------------------------------- through the server
class Scripted:
    """A scheduler that answers every job with ``self.deltas`` (no model)."""

    def __init__(self):
        self.deltas = list(R1_DELTAS)

    def start(self):
        return self

    def submit(self, job):
        for d in self.deltas:
            job.emit(GenEvent("delta", text=d))
        job.emit(GenEvent("done", finish_reason="stop", completion_tokens=len(self.deltas)))

    def cancel(self, job):
        pass

    def stop(self, timeout=None):
        pass

    def health(self):
        return SchedulerHealth(0, False, True)


class _Model:
    config = type("Config", (), {"max_position_embeddings": 512})()


def _server(tmp_path, template=None, **kw):
    tok = make_tokenizer(chat_template=template)
    state = serve_state_from(_Model(), tok, model_name=M, db_path=tmp_path / "log.sqlite", scheduler=Scripted(),
                             **kw)
    return state, ServerThread(create_app(state))


def _client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=WAIT)


def _create(client, **kw):
    return client.chat.completions.create(model=M, messages=[{"role": "user", "content": "2+2?"}], max_tokens=8,
                                          **kw)


def _streamed(client, **kw):
    """(reasoning, content, field order) of a streamed response, per choice index."""
    out: dict[int, dict] = {}
    for chunk in _create(client, stream=True, **kw):
        for ch in chunk.choices:
            d = out.setdefault(ch.index, {"reasoning": "", "content": "", "order": []})
            extra = ch.delta.model_extra or {}
            if extra.get("reasoning_content"):
                d["reasoning"] += extra["reasoning_content"]
                d["order"].append("r")
            if ch.delta.content:
                d["content"] += ch.delta.content
                d["order"].append("c")
    return out


def test_openai_client_gets_reasoning_content_and_content(tmp_path):
    state, server = _server(tmp_path)
    with server as srv:
        client = _client(srv)
        r = _create(client, extra_body={"rain_checks": [{"instruction_id": "spec:startswith",
                                                        "kwargs": {"text": "The answer"}}]})
        msg = r.choices[0].message
        assert msg.model_extra["reasoning_content"] == "Let me think." and msg.content == "\n\nThe answer is 4."
        # the checks score the answer with the thinking stripped, and the format sees the full text
        assert r.model_extra["rain"]["compliant"] is True and r.model_extra["rain"]["format_valid"] is True
        s = _streamed(client)[0]
        assert (s["reasoning"], s["content"]) == ("Let me think.", "\n\nThe answer is 4.")
        assert s["order"] == sorted(s["order"], key=lambda f: f == "c") and "r" in s["order"]
        # today's behaviour on request: the thinking stays in content
        keep = _create(client, extra_body={"rain_reasoning_parser": "none"}).choices[0].message
        assert keep.content == R1_TEXT and "reasoning_content" not in (keep.model_extra or {})
        s = _streamed(client, extra_body={"rain_reasoning_parser": "none"})[0]
        assert (s["reasoning"], s["content"]) == ("", R1_TEXT)
        rows = state.db.rows()
    assert len(rows) == 4 and {r["format_valid"] for r in rows} == {1}  # every row scored the full text


def test_streamed_choices_each_split_and_plain_http(tmp_path):
    state, server = _server(tmp_path)
    with server as srv:
        s = _streamed(_client(srv), n=2)
        assert set(s) == {0, 1}
        assert all((d["reasoning"], d["content"]) == ("Let me think.", "\n\nThe answer is 4.") for d in s.values())
        body = {"model": M, "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 8, "stream": True}
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body, timeout=WAIT) as r:
            events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert deltas[-1] == {} and events[-1]["choices"][0]["finish_reason"] == "stop"
        assert all(set(d) <= {"reasoning_content", "content"} and len(d) == 1 for d in deltas[1:-1])
        assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me think."
        assert not any("</" in d.get("reasoning_content", "") + d.get("content", "") for d in deltas)
        j = httpx.post(srv.base_url + "/v1/chat/completions", timeout=WAIT,
                       json={**body, "stream": False, "n": 2}).json()
        assert [c["message"]["reasoning_content"] for c in j["choices"]] == ["Let me think."] * 2
        for bad, where in (({"rain_reasoning_parser": "qwen3"}, "chat/completions"),
                           ({"rain_reasoning_parser": "none"}, "completions")):
            req = {**body, "stream": False, **bad} if where.startswith("chat") else \
                {"model": M, "prompt": "x", "max_tokens": 2, **bad}
            r = httpx.post(f"{srv.base_url}/v1/{where}", json=req, timeout=WAIT)
            assert r.status_code == 400 and r.json()["error"]["param"] == "rain_reasoning_parser"


def test_server_default_none_and_a_template_that_does_not_open_thinking(tmp_path):
    state, server = _server(tmp_path, reasoning_parser="none")
    with server as srv:
        client = _client(srv)
        assert _create(client).choices[0].message.content == R1_TEXT
        msg = _create(client, extra_body={"rain_reasoning_parser": "deepseek_r1"}).choices[0].message
        assert msg.model_extra["reasoning_content"] == "Let me think."
    with pytest.raises(ValueError, match="reasoning_parser"):
        _server(tmp_path / "bad", reasoning_parser="qwen3")
    state, server = _server(tmp_path / "plain", template=PLAIN_CHAT_TEMPLATE)
    state.scheduler.deltas = ["<thi", "nk>mm</think>", "\n\nok"]  # the model opens the block itself
    with server as srv:
        client = _client(srv)
        msg = _create(client).choices[0].message
        assert (msg.model_extra["reasoning_content"], msg.content) == ("mm", "\n\nok")
        state.scheduler.deltas = ["no thinking here"]
        msg = _create(client).choices[0].message
        assert msg.content == "no thinking here" and msg.model_extra["reasoning_content"] is None
        s = _streamed(client)[0]
        assert (s["reasoning"], s["content"]) == ("", "no thinking here")


def test_tiny_model_through_the_real_scheduler(tmp_path_factory):
    from rain_adapter.testing.serve_tiny import build_tiny_serving, tiny_serve_state

    root = tmp_path_factory.mktemp("tiny-reasoning")
    model_dir, adapter_dir = build_tiny_serving(root)
    state = tiny_serve_state(model_dir, adapter_dir, model_name=M, db_path=root / "l.sqlite", max_tokens_cap=16,
                             context_length=256)
    with ServerThread(create_app(state)) as srv:
        client = _client(srv)
        split = _create(client, temperature=0).choices[0].message
        keep = _create(client, temperature=0, extra_body={"rain_reasoning_parser": "none"}).choices[0].message
        s = _streamed(client, temperature=0)[0]
    want = split_reasoning(keep.content, True)  # the template opened <think>: the same text, split
    assert (split.model_extra["reasoning_content"], split.content) == want
    assert (s["reasoning"] or None, s["content"] or None) == want
