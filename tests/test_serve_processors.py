"""Every request batches (issue 22, part 4): per-row logits processing and logprobs in one batch, the
sampler fields vLLM honours (min_p, allowed_token_ids, bad_words, stop_token_ids), vocabulary checks, and
EOS counted as vLLM counts it.

* the batched processor against a float64 reference written with Python loops, row by row;
* a batch mixing plain rows and rows with each processor (and logprobs, and echo) gives every row the
  tokens and logprobs (within 1e-5) it gets alone, in one generate call — dynamic and continuous mode;
* each new field's effect through the HTTP server, and 400s naming the field.
"""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch

from rain_adapter.serve.row_logits import BatchLogitsProcessor
from rain_adapter.serve.sampling import LogitsSpec, bad_words_ids, parse_logits_spec, process_row
from rain_adapter.serve.scheduler import GenJob, GenParams


def _ref(z, prompt, gen, spec, eos, temperature, bad):
    """Every step of serve/sampling.py's module doc, float64 Python loops."""
    z = [float(v) for v in z]
    V = len(z)
    if spec.repetition_penalty != 1.0:
        for t in set(prompt) | set(gen):
            z[t] = z[t] / spec.repetition_penalty if z[t] > 0 else z[t] * spec.repetition_penalty
    if gen:
        for t in set(gen):
            z[t] -= spec.frequency_penalty * gen.count(t) + spec.presence_penalty
    for t, b in spec.logit_bias:
        z[t] += b
    ninf = float("-inf")
    if spec.allowed_token_ids:
        z = [v if t in spec.allowed_token_ids else ninf for t, v in enumerate(z)]
    for w in bad:
        if len(w) == 1 or (len(w) - 1 <= len(gen) and gen[len(gen) - len(w) + 1:] == list(w[:-1])):
            z[w[-1]] = ninf
    if spec.ignore_eos:
        for e in eos:
            z[e] = ninf
    if len(gen) < spec.min_tokens:
        for e in list(eos) + list(spec.stop_token_ids):
            z[e] = ninf
    if 0 < spec.top_k < V:
        kth = sorted(z, reverse=True)[spec.top_k - 1]
        z = [v if v >= kth else ninf for v in z]
    if spec.min_p > 0:
        floor = max(z) + temperature * math.log(spec.min_p)
        z = [v if v >= floor else ninf for v in z]
    return torch.tensor(z, dtype=torch.float64)


SPECS = [None, LogitsSpec(repetition_penalty=1.3), LogitsSpec(frequency_penalty=0.7, presence_penalty=-0.5),
         LogitsSpec(logit_bias=((3, 5.0), (7, -100.0))), LogitsSpec(top_k=4), LogitsSpec(min_tokens=2),
         LogitsSpec(ignore_eos=True), LogitsSpec(min_p=0.3), LogitsSpec(allowed_token_ids=(2, 5, 9, 31)),
         LogitsSpec(bad_words=("ab", "c")), LogitsSpec(min_tokens=3, stop_token_ids=(4,)),
         LogitsSpec(0.4, 0.3, 1.2, ((1, 2.0),), 6, 2, False, 0.05, (), ("b",), ())]


class _CharTok:
    """bad_words tokeniser for the unit test: a=1, b=2, c=3, space=30."""

    def encode(self, text, add_special_tokens=False):
        return [{"a": 1, "b": 2, "c": 3, " ": 30}[c] for c in text]


def test_batch_processor_rows_match_float64_reference():
    g = torch.Generator().manual_seed(1234)
    B, V, width, eos, temp = len(SPECS), 32, 5, [0, 31], 0.7
    lens = [1 + (b % width) for b in range(B)]
    prompt = torch.randint(1, V, (B, width), generator=g)
    for b, n in enumerate(lens):
        prompt[b, : width - n] = 0  # left padding: must not count as prompt tokens
    bad = [bad_words_ids(_CharTok(), s.bad_words) if s is not None else () for s in SPECS]
    assert bad[9] == ((1, 2), (3,))  # " ab" / " c" are longer: vLLM keeps the spaced form only at equal length
    proc = BatchLogitsProcessor(SPECS, prompt, lens, eos, record=True, temperature=temp, bad_ids=bad)
    ids, changed = prompt.clone(), set()
    for step in range(4):
        z = torch.randn(B, V, generator=g, dtype=torch.float64)
        got = proc(ids, z)
        torch.testing.assert_close(proc.last, torch.log_softmax(z, -1).float())  # recorded in float32
        for b, spec in enumerate(SPECS):
            p, gen = prompt[b, width - lens[b]:].tolist(), ids[b, width:].tolist()
            if spec is None:
                assert torch.equal(got[b], z[b])
                continue
            ref = _ref(z[b].tolist(), p, gen, spec, eos, temp, bad[b])
            one = process_row(z[b], torch.tensor(p), torch.tensor(gen, dtype=torch.long), spec, eos, temp, bad[b])
            for out in (got[b], one):
                assert torch.equal(torch.isinf(out), torch.isinf(ref)), (step, b, spec)
                fin = ~torch.isinf(ref)
                torch.testing.assert_close(out[fin], ref[fin], rtol=1e-12, atol=1e-12)
            changed.add(b) if not torch.equal(got[b], z[b]) else None
        # the next column: a token that exercises bad-word prefixes and penalties
        nxt = torch.tensor([[1 if step % 2 == 0 else 2] for _ in range(B)])
        ids = torch.cat([ids, nxt], dim=1)
    assert changed == {b for b, s in enumerate(SPECS) if s is not None}  # every spec changed some step's logits


def test_parse_new_fields_and_vocabulary_checks():
    from rain_adapter.serve.errors import APIError

    spec = parse_logits_spec({"min_p": 0.1, "allowed_token_ids": [5, 3, 5], "bad_words": ["x"],
                              "stop_token_ids": [7]}, 8, vocab_size=10)
    assert (spec.min_p, spec.allowed_token_ids, spec.bad_words, spec.stop_token_ids) == (0.1, (3, 5), ("x",), (7,))
    assert not parse_logits_spec({"stop_token_ids": [7]}, 8).logits_active  # ends rows only: still "plain"
    assert GenParams(4, processing=parse_logits_spec({"stop_token_ids": [7]}, 8)).plain
    assert not GenParams(4, processing=spec).plain
    for body, field in (({"logit_bias": {"10": 1}}, "logit_bias"), ({"logit_bias": {"-1": 1}}, "logit_bias"),
                        ({"allowed_token_ids": [10]}, "allowed_token_ids"), ({"allowed_token_ids": []},
                                                                             "allowed_token_ids"),
                        ({"min_p": 1.5}, "min_p"), ({"bad_words": "x"}, "bad_words"), ({"bad_words": [" "]},
                                                                                      "bad_words"),
                        ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"stop_token_ids": [True]},
                                                                       "stop_token_ids")):
        with pytest.raises(APIError) as ei:
            parse_logits_spec(body, 8, vocab_size=10)
        assert ei.value.param == field, body


# ----------------------------------------------------------------------------- the schedulers
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rain_adapter.serve.state import load_served_model
    from rain_adapter.testing.serve_tiny import build_tiny_serving

    model_dir, adapter_dir = build_tiny_serving(tmp_path_factory.mktemp("proc"))
    model, tok = load_served_model(str(model_dir), str(adapter_dir), device="cpu", dtype="float32")
    return model, tok, model_dir, adapter_dir


def _run(sched, work):
    """Submit every (prompt, λ, params) before the worker starts (so they can share a batch); return
    [(job, events)]."""
    async def go():
        loop = asyncio.get_running_loop()
        jobs = [GenJob(f"j{i}", list(p), lam, gp, loop, asyncio.Queue()) for i, (p, lam, gp) in enumerate(work)]
        sched.start()
        for j in jobs:
            sched.submit(j)
        out = []
        for j in jobs:
            evs = []
            while not evs or evs[-1].kind not in ("done", "error"):
                evs.append(await asyncio.wait_for(j.events.get(), 300))
            assert evs[-1].kind == "done", evs[-1].error
            out.append((j, evs))
        return out

    try:
        return asyncio.run(go())
    finally:
        sched.stop(timeout=120)


def _result(job, evs):
    d = evs[-1]
    return ("".join(e.text for e in evs if e.kind == "delta"), d.finish_reason, d.stop_reason, d.completion_tokens)


def _mixed_work(tok):
    eos = tok.eos_token_id
    rows = [(None, None), (LogitsSpec(repetition_penalty=1.5), 2), (LogitsSpec(frequency_penalty=1.0,
                                                                              presence_penalty=0.5), None),
            (LogitsSpec(logit_bias=((65, 8.0),)), 0), (LogitsSpec(top_k=3), None), (LogitsSpec(min_tokens=6), 1),
            (LogitsSpec(ignore_eos=True), None), (LogitsSpec(min_p=0.5), 2),
            (LogitsSpec(allowed_token_ids=(65, 66, 67, eos)), 3), (LogitsSpec(bad_words=("a", "e")), None),
            (LogitsSpec(stop_token_ids=(101,)), None), (None, 2),  # stop ids alone: the CB loop in continuous mode
            (LogitsSpec(logit_bias=((eos, 100.0),), min_tokens=2), 1)]  # ends with EOS after 2 tokens
    prompts = ["Hello there", "a", "The answer is", "xyz xyz xyz", "Tell me a story", "b c"]
    work = []
    for i, (spec, lp) in enumerate(rows):
        ids = tok(prompts[i % len(prompts)], add_special_tokens=False)["input_ids"]
        work.append((ids, (0.0, 0.5, 1.0, 2.0)[i % 4], GenParams(max_tokens=10, temperature=0.0, processing=spec,
                                                                   logprobs=lp)))
    echo = tok("The answer is yes", add_special_tokens=False)["input_ids"]
    work.append((echo, 1.0, GenParams(max_tokens=1, temperature=0.0, logprobs=1, prompt_logprobs=True)))
    return work


def _compare(batched, alone):
    for (jb, eb), (ja, ea) in zip(batched, alone):
        assert _result(jb, eb) == _result(ja, ea), jb.params
        assert [e[0] for e in jb.token_logprobs] == [e[0] for e in ja.token_logprobs]
        for x, y in zip(jb.token_logprobs + (jb.prompt_logprobs or [])[1:],
                        ja.token_logprobs + (ja.prompt_logprobs or [])[1:]):
            assert x[1] == pytest.approx(y[1], abs=1e-5)
            assert [i for i, _ in x[2]] == [i for i, _ in y[2]]
            assert [v for _, v in x[2]] == pytest.approx([v for _, v in y[2]], abs=1e-5)


def test_mixed_batch_gives_every_row_what_it_gets_alone(tiny):
    from rain_adapter.serve.batching import BatchScheduler

    model, tok, *_ = tiny
    work = _mixed_work(tok)
    batched = _run(BatchScheduler(model, tok, max_batch_size=len(work), batch_window_ms=50), work)
    alone = _run(BatchScheduler(model, tok, max_batch_size=1, batch_window_ms=0), work)
    assert all(j.batch_size == len(work) for j, _ in batched)  # one generate call for all of them
    assert all(j.batch_size == 1 for j, _ in alone)
    _compare(batched, alone)
    res = {i: _result(*batched[i]) for i in range(len(work))}
    eos_row, eos = batched[12][0], tok.eos_token_id
    assert res[12][1:] == ("stop", None, 3)  # EOS counted in completion_tokens, as vLLM
    assert [e[0] for e in eos_row.token_logprobs][-1] == eos and len(eos_row.token_logprobs) == 3
    assert res[6][1] == "length" and res[5][3] >= 6
    assert set(res[8][0]) <= set("ABC")
    assert batched[13][0].prompt_logprobs[0][1] is None and len(batched[13][0].prompt_logprobs) == len(work[13][0])


def test_sampled_rows_with_processors_share_a_batch(tiny):
    from rain_adapter.serve.batching import BatchScheduler

    model, tok, *_ = tiny
    torch.manual_seed(0)
    allowed = LogitsSpec(allowed_token_ids=(65, 66), ignore_eos=True)
    work = [(tok("Hi", add_special_tokens=False)["input_ids"], 1.0,
             GenParams(max_tokens=6, temperature=1.5, processing=spec, logprobs=lp))
            for spec, lp in ((allowed, 1), (None, None), (LogitsSpec(min_p=1.0), None), (allowed, None))]
    out = _run(BatchScheduler(model, tok, max_batch_size=8, batch_window_ms=50), work)
    assert all(j.batch_size == 4 for j, _ in out)
    assert set(_result(*out[0])[0]) <= set("AB") and set(_result(*out[3])[0]) <= set("AB")
    greedy = _run(BatchScheduler(model, tok, max_batch_size=1, batch_window_ms=0),
                  [(work[2][0], 1.0, GenParams(max_tokens=6, temperature=0.0))])
    assert _result(*out[2])[0] == _result(*greedy[0])[0]  # min_p = 1 keeps the argmax alone


def test_continuous_mode_keeps_processor_rows_in_the_cb_loop(tiny):
    """In continuous mode, greedy rows with processors / logprobs run in transformers' CB loop next to
    plain rows (cb_logits.CBRowProcessor), the echo row in the dynamic path; each gets what it gets alone."""
    from rain_adapter.serve.batching import BatchScheduler
    from rain_adapter.serve.continuous import ContinuousScheduler

    model, tok, *_ = tiny
    work = _mixed_work(tok)
    # max_batch_tokens 8: prompts are prefilled in pieces while other rows decode (logits rows without a
    # new token in the same step)
    cs = ContinuousScheduler(model, tok, max_batch_size=len(work), batch_window_ms=50, max_new_tokens=16,
                             max_batch_tokens=8, num_blocks=64, page_size=16)
    batched = _run(cs, work)
    alone = _run(BatchScheduler(model, tok, max_batch_size=1, batch_window_ms=0), work)
    rp = cs.rows_proc
    assert rp.calls > 0 and not (rp._reqs or rp._lps or rp._consts)  # used, then forgotten
    assert max(j.batch_size for j, _ in batched[:-1]) == len(work) - 1  # all greedy rows shared the CB loop
    _compare(batched, alone)


# ----------------------------------------------------------------------------- through the server
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    from rain_adapter.serve.app import create_app
    from rain_adapter.testing.serve_tiny import tiny_serve_state
    from rain_adapter.testing.server import ServerThread

    _, _, model_dir, adapter_dir = tiny
    root = tmp_path_factory.mktemp("proc-http")
    state = tiny_serve_state(model_dir, adapter_dir, model_name="m", db_path=root / "l.sqlite", max_tokens_cap=16,
                             context_length=256)
    srv = ServerThread(create_app(state)).start()
    yield srv, state
    srv.stop()


def _post(srv, body, path="/v1/completions"):
    return httpx.post(srv.base_url + path, json=body, timeout=120)


BASE = {"model": "m", "prompt": "Hello", "max_tokens": 8, "temperature": 0, "rain_lambda": 1.0}


def test_http_allowed_token_ids_and_stop_token_ids(served):
    srv, _ = served
    abc = {**BASE, "allowed_token_ids": [65, 66, 67], "ignore_eos": True}
    r = _post(srv, abc).json()["choices"][0]
    assert r["finish_reason"] == "length" and len(r["text"]) == 8 and set(r["text"]) <= set("ABC"), r
    stop = r["text"][2]
    s = _post(srv, {**abc, "stop_token_ids": [ord(stop)], "logprobs": 0})
    got = s.json()
    c = got["choices"][0]
    cut = r["text"].index(stop)
    assert (c["finish_reason"], c["stop_reason"], c["text"]) == ("stop", ord(stop), r["text"][:cut])
    assert got["usage"]["completion_tokens"] == cut + 1 and c["logprobs"]["tokens"][-1] == stop  # counted, as vLLM
    plain = _post(srv, {**BASE, "max_tokens": 4, "stop_token_ids": [3]}).json()["choices"][0]
    assert plain["text"] == _post(srv, {**BASE, "max_tokens": 4}).json()["choices"][0]["text"]


def test_http_bad_words(served):
    srv, _ = served
    abc = {**BASE, "allowed_token_ids": [65, 66, 67], "ignore_eos": True}
    text = _post(srv, abc).json()["choices"][0]["text"]
    banned = max(set(text), key=text.count)
    out = _post(srv, {**abc, "bad_words": [banned]}).json()["choices"][0]["text"]
    assert banned in text and banned not in out and len(out) == 8 and set(out) <= set("ABC") - {banned}


def test_http_min_p(served):
    srv, _ = served
    greedy = _post(srv, {**BASE, "ignore_eos": True}).json()["choices"][0]["text"]
    hot = {**BASE, "temperature": 2.0, "ignore_eos": True, "seed": 7}
    assert _post(srv, hot).json()["choices"][0]["text"] != greedy  # sampling at T = 2 wanders
    assert _post(srv, {**hot, "min_p": 1.0}).json()["choices"][0]["text"] == greedy  # min_p = 1: the argmax only


def test_http_out_of_vocabulary_ids_are_400(served):
    srv, state = served
    V = state.limits.vocab_size
    assert V == len(state.tokenizer)
    for field, value in (("logit_bias", {str(V): 1}), ("allowed_token_ids", [1, V]), ("min_p", -0.1),
                         ("bad_words", [""]), ("stop_token_ids", ["x"])):
        r = _post(srv, {**BASE, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    assert _post(srv, {**BASE, "logit_bias": {str(V - 1): 1}}).status_code == 200


def test_http_eos_counted_in_usage_and_logprobs(served):
    srv, state = served
    eos = state.tokenizer.eos_token_id
    eos_text = state.tokenizer.decode([eos], skip_special_tokens=False)
    body = {**BASE, "logit_bias": {str(eos): 100}, "min_tokens": 2, "logprobs": 1}
    got = _post(srv, body).json()
    c = got["choices"][0]
    assert c["finish_reason"] == "stop" and got["usage"]["completion_tokens"] == 3
    assert len(c["logprobs"]["tokens"]) == 3 and c["logprobs"]["tokens"][-1] == eos_text
    assert eos_text not in c["text"]
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0,
            "logit_bias": {str(eos): 100}, "min_tokens": 1, "logprobs": True, "rain_reasoning_parser": "none"}
    got = _post(srv, chat, "/v1/chat/completions").json()
    content = got["choices"][0]["logprobs"]["content"]
    assert got["usage"]["completion_tokens"] == 2 == len(content) and content[-1]["token"] == eos_text
    r = httpx.post(srv.base_url + "/v1/completions", json={**body, "stream": True,
                                                          "stream_options": {"include_usage": True}}, timeout=60)
    chunks = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
    assert chunks[-1]["usage"]["completion_tokens"] == 3
