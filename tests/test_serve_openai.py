"""The OpenAI / vLLM surface of `rain serve` (issue 13, P4): logprobs against a forward pass, echo,
token-id prompts, the logits processor (penalties, bias, top_k, min_tokens, ignore_eos) against a
float64 reference, and clear 400s for what is not implemented."""

from __future__ import annotations

import json

import pytest
import torch

from rain_adapter.serve.sampling import LogitsSpec, RequestLogitsProcessor, process_row


def _ref(z, prompt, gen, spec, eos):
    """The module doc's definition, written out in float64 with Python loops."""
    z = [float(v) for v in z]
    for t in set(prompt) | set(gen):
        z[t] = z[t] / spec.repetition_penalty if z[t] > 0 else z[t] * spec.repetition_penalty
    for t in set(gen):
        c = gen.count(t)
        z[t] -= spec.frequency_penalty * c + spec.presence_penalty
    for t, b in spec.logit_bias:
        z[t] += b
    if spec.ignore_eos or len(gen) < spec.min_tokens:
        for e in eos:
            z[e] = float("-inf")
    if spec.top_k:
        kth = sorted(z, reverse=True)[spec.top_k - 1]
        z = [v if v >= kth else float("-inf") for v in z]
    return torch.tensor(z, dtype=torch.float64)


SPECS = [LogitsSpec(repetition_penalty=1.3), LogitsSpec(frequency_penalty=0.7), LogitsSpec(presence_penalty=-0.5),
         LogitsSpec(logit_bias=((3, 5.0), (7, -100.0))), LogitsSpec(top_k=4), LogitsSpec(min_tokens=5),
         LogitsSpec(ignore_eos=True),
         LogitsSpec(0.4, 0.3, 1.2, ((1, 2.0),), 6, 2, False)]


@pytest.mark.parametrize("spec", SPECS, ids=[str(i) for i in range(len(SPECS))])
def test_logits_processor_matches_float64_reference(spec):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(32, generator=g, dtype=torch.float64)
    prompt, gen, eos = [1, 2, 2, 9], [3, 3, 5, 9], [0, 31]
    got = process_row(z, torch.tensor(prompt), torch.tensor(gen), spec, eos)
    ref = _ref(z.tolist(), prompt, gen, spec, eos)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got[~torch.isinf(ref)], ref[~torch.isinf(ref)], rtol=1e-12, atol=1e-12)
    assert not torch.equal(got, z)  # each parameter changes the logits


def test_processor_records_raw_logprobs_and_is_inert_by_default():
    z = torch.randn(2, 10)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    proc = RequestLogitsProcessor(LogitsSpec(), prompt_len=2, eos_ids=[0], record=True)
    assert proc.spec is None and torch.equal(proc(ids, z), z)
    torch.testing.assert_close(proc.last, torch.log_softmax(z, -1))


# ----------------------------------------------------------------------------- through the server
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from rain_adapter.serve.app import create_app
    from rain_adapter.testing.serve_tiny import build_tiny_serving, tiny_serve_state
    from rain_adapter.testing.server import ServerThread

    root = tmp_path_factory.mktemp("oai")
    model_dir, adapter_dir = build_tiny_serving(root)
    state = tiny_serve_state(model_dir, adapter_dir, model_name="m", db_path=root / "l.sqlite", max_tokens_cap=16,
                             context_length=256)
    srv = ServerThread(create_app(state)).start()
    yield srv, state
    srv.stop()


def _post(srv, path, body):
    return httpx.post(srv.base_url + path, json=body, timeout=60)


def test_echo_logprobs_equal_a_forward_pass(served):
    srv, state = served
    ids = state.tokenizer("The answer is")["input_ids"]
    r = _post(srv, "/v1/completions", {"model": "m", "prompt": "The answer is", "max_tokens": 1, "temperature": 0,
                                       "echo": True, "logprobs": 2, "rain_lambda": 1.5})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert r.json()["choices"][0]["text"].startswith("The answer is")
    model = state.model
    with torch.inference_mode():
        model.set_lambda(1.5)
        logits = model(torch.tensor([ids])).logits[0].double()
    ref = torch.log_softmax(logits, -1)
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids) + 1
    for t in range(1, len(ids)):
        assert lp["token_logprobs"][t] == pytest.approx(float(ref[t - 1, ids[t]]), abs=1e-4)
    # the generated token: greedy, so it is the argmax of the last position, with its logprob
    assert lp["token_logprobs"][-1] == pytest.approx(float(ref[-1].max()), abs=1e-4)
    assert len(lp["top_logprobs"][-1]) == 2


def test_completion_top_logprobs_include_the_chosen_token(served):
    """As vLLM / OpenAI: each position's top_logprobs holds the token itself and the k most likely, so
    logprobs=0 gives the chosen token alone (was {}), and a sampled token outside the top k is there too."""
    srv, _ = served
    base = {"model": "m", "prompt": "The answer is", "max_tokens": 8, "echo": True}
    zero = _post(srv, "/v1/completions", {**base, "temperature": 0, "logprobs": 0}).json()["choices"][0]["logprobs"]
    assert zero["top_logprobs"][0] is None
    assert zero["top_logprobs"][1:] == [{t: v} for t, v in zip(zero["tokens"][1:], zero["token_logprobs"][1:])]
    hot = _post(srv, "/v1/completions", {**base, "temperature": 2.0, "seed": 7, "logprobs": 1,
                                         "rain_lambda": 1.0}).json()["choices"][0]["logprobs"]
    rows = list(zip(hot["tokens"], hot["token_logprobs"], hot["top_logprobs"]))[1:]
    assert all(top[t] == v and next(iter(top)) == t and len(top) in (1, 2) for t, v, top in rows), rows
    assert any(len(top) == 2 for _, _, top in rows)  # some token was not the most likely one


def test_stop_reason_as_vllm_sends_it(served):
    """stop_reason: the matched stop string when one ended the choice, null at length (and EOS); streamed
    on every completions chunk (null until the last) and on chat's finishing chunk."""
    srv, _ = served
    base = {"model": "m", "prompt": "The answer is", "max_tokens": 12, "temperature": 0, "rain_lambda": 1.0}
    full = _post(srv, "/v1/completions", base).json()["choices"][0]
    assert full["finish_reason"] == "length" and "stop_reason" in full and full["stop_reason"] is None
    stop = full["text"][3:5]
    assert len(stop) == 2 and full["text"].find(stop) == 3, full["text"]  # the tiny model's text is fixed
    got = _post(srv, "/v1/completions", {**base, "stop": ["zzzz", stop]}).json()["choices"][0]
    assert (got["finish_reason"], got["stop_reason"], got["text"]) == ("stop", stop, full["text"][:3])
    r = httpx.post(srv.base_url + "/v1/completions", json={**base, "stop": [stop], "stream": True}, timeout=60)
    chunks = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
    assert [c["choices"][0]["stop_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [stop]
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0,
            "rain_lambda": 1.0, "rain_reasoning_parser": "none"}
    text = _post(srv, "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
    cstop = text[2:4]
    c = _post(srv, "/v1/chat/completions", {**chat, "stop": cstop}).json()["choices"][0]
    assert len(cstop) == 2 and (c["finish_reason"], c["stop_reason"]) == ("stop", cstop), (text, c)
    r = httpx.post(srv.base_url + "/v1/chat/completions", json={**chat, "stop": cstop, "stream": True}, timeout=60)
    last = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")][-1]["choices"][0]
    assert last["finish_reason"] == c["finish_reason"] and last["stop_reason"] == c["stop_reason"]


def test_chat_logprobs_and_token_id_prompts(served):
    srv, state = served
    r = _post(srv, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                            "max_tokens": 4, "temperature": 0, "logprobs": True,
                                            "top_logprobs": 3})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content and all(len(c["top_logprobs"]) == 3 and c["logprob"] <= 0 for c in content)
    assert all(c["logprob"] == pytest.approx(c["top_logprobs"][0]["logprob"]) for c in content)  # greedy
    ids = state.tokenizer("Tell me")["input_ids"]
    texts = [_post(srv, "/v1/completions", {"model": "m", "prompt": p, "max_tokens": 6, "temperature": 0})
             .json()["choices"][0]["text"] for p in ("Tell me", ids, [ids])]
    assert texts[0] == texts[1] == texts[2]


def test_penalties_change_the_output_and_unsupported_is_400(served):
    srv, _ = served
    base = {"model": "m", "prompt": "a a a a", "max_tokens": 8, "temperature": 0}
    plain = _post(srv, "/v1/completions", base).json()["choices"][0]
    banned = _post(srv, "/v1/completions", {**base, "min_tokens": 8, "ignore_eos": True}).json()["choices"][0]
    assert banned["finish_reason"] == "length"
    biased = _post(srv, "/v1/completions", {**base, "logit_bias": {"65": 100}}).json()["choices"][0]
    forced = served[1].tokenizer.decode([65], skip_special_tokens=False)
    assert biased["text"] != plain["text"] and biased["text"] == forced * (len(biased["text"]) // len(forced))
    for field, value in (("n", 17), ("top_k", -5), ("presence_penalty", 3), ("suffix", "x")):
        r = _post(srv, "/v1/completions", {**base, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
