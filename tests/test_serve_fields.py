"""No silent field (issue 22, 5): every field the OpenAI and vLLM request schemas define is HONOURED or
REFUSED in ``rain_adapter/serve/field_policy.py`` — no third state — every refused field with a
non-default value is a 400 naming it, and every honoured field has a test of its effect (here, or the
test named in :data:`EFFECT_TESTS`).

The field lists are ``tests/data/serve_request_fields.json`` (their sources and date are in the file).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from rain_adapter.serve.errors import APIError
from rain_adapter.serve.field_policy import CHAT, COMPLETIONS, HONOURED, REFUSED
from rain_adapter.serve.requests import RequestLimits, parse_chat, parse_completion

TESTS = Path(__file__).parent
FIELDS = json.loads((TESTS / "data" / "serve_request_fields.json").read_text())
LIMITS = RequestLimits(model_name="m", lambda_range=(0.0, 2.0), arm_names=frozenset({"a"}), max_tokens_cap=16)
HERE = "tests/test_serve_fields.py"
OAI = "tests/test_serve_openai.py"
SERVE = "tests/test_serve.py"
PROC = "tests/test_serve_processors.py"   # the sampler-side fields (issue 22, 4/5: the serve-proc branch)

#: honoured field -> the test of its effect ("path::test_name")
EFFECT_TESTS = {
    "model": "tests/test_serve_units.py::test_parse_model_mismatch_is_404",
    "messages": f"{SERVE}::test_lambda_zero_is_bare_lrm",
    "prompt": f"{OAI}::test_chat_logprobs_and_token_id_prompts",
    "max_tokens": f"{SERVE}::test_lambda_zero_is_bare_lrm",
    "max_completion_tokens": "tests/test_serve_units.py::test_parse_chat_request_fields",
    "temperature": f"{SERVE}::test_sampling_with_seed_is_reproducible",
    "top_p": f"{HERE}::test_top_p_near_zero_is_greedy",
    "top_k": f"{OAI}::test_logits_processor_matches_float64_reference",
    "min_p": f"{PROC}::test_http_min_p",
    "n": "tests/test_serve_choices.py::test_n3_greedy_choices_are_identical_and_logged_per_choice",
    "seed": f"{SERVE}::test_sampling_with_seed_is_reproducible",
    "stop": f"{SERVE}::test_stop_string_ends_the_answer",
    "stop_token_ids": f"{PROC}::test_http_allowed_token_ids_and_stop_token_ids",
    "include_stop_str_in_output": f"{HERE}::test_include_stop_str_in_output",
    "ignore_eos": f"{OAI}::test_penalties_change_the_output_and_unsupported_is_400",
    "min_tokens": f"{OAI}::test_logits_processor_matches_float64_reference",
    "frequency_penalty": f"{OAI}::test_logits_processor_matches_float64_reference",
    "presence_penalty": f"{OAI}::test_logits_processor_matches_float64_reference",
    "repetition_penalty": f"{OAI}::test_logits_processor_matches_float64_reference",
    "logit_bias": f"{OAI}::test_penalties_change_the_output_and_unsupported_is_400",
    "allowed_token_ids": f"{PROC}::test_http_allowed_token_ids_and_stop_token_ids",
    "bad_words": f"{PROC}::test_http_bad_words",
    "logprobs": f"{OAI}::test_echo_logprobs_equal_a_forward_pass",
    "top_logprobs": f"{OAI}::test_chat_logprobs_and_token_id_prompts",
    "prompt_logprobs": f"{HERE}::test_prompt_logprobs_equal_a_forward_pass",
    "return_tokens_as_token_ids": f"{HERE}::test_return_tokens_as_token_ids",
    "echo": f"{HERE}::test_chat_echo_and_continue_final_message",
    "skip_special_tokens": f"{HERE}::test_skip_special_tokens",
    "spaces_between_special_tokens": f"{HERE}::test_skip_special_tokens",
    "truncate_prompt_tokens": f"{HERE}::test_truncate_prompt_tokens",
    "add_special_tokens": f"{HERE}::test_add_special_tokens",
    "add_generation_prompt": f"{HERE}::test_add_generation_prompt",
    "continue_final_message": f"{HERE}::test_chat_echo_and_continue_final_message",
    "chat_template": "tests/test_serve_hostile.py::test_with_the_opt_in_a_request_template_is_used",
    "chat_template_kwargs": f"{HERE}::test_add_generation_prompt",
    "include_reasoning": f"{HERE}::test_include_reasoning_false_drops_the_thinking",
    "parallel_tool_calls": f"{HERE}::test_hints_are_type_checked_and_change_nothing",
    "stream": f"{SERVE}::test_completions_and_streaming_match",
    "stream_options": f"{HERE}::test_continuous_usage_stats",
    "stream_options.include_usage": "tests/test_serve_choices.py::test_streaming_with_several_choices_tags_each_chunk",
    "stream_options.continuous_usage_stats": f"{HERE}::test_continuous_usage_stats",
    "user": f"{SERVE}::test_chat_completions_and_arm_header",
    "safety_identifier": f"{HERE}::test_hints_are_type_checked_and_change_nothing",
    "prompt_cache_key": f"{HERE}::test_hints_are_type_checked_and_change_nothing",
    "prompt_cache_retention": f"{HERE}::test_hints_are_type_checked_and_change_nothing",
    "cache_salt": f"{HERE}::test_hints_are_type_checked_and_change_nothing",
    "rain_lambda": f"{SERVE}::test_lambda_zero_is_bare_lrm",
    "rain_arm": f"{SERVE}::test_explicit_arm_and_lambda",
    "rain_checks": f"{SERVE}::test_feedback_checks_ab_and_metrics",
    "rain_reasoning_parser":
        "tests/test_serve_reasoning.py::test_server_default_none_and_a_template_that_does_not_open_thinking",
}

#: a value that asks for something, per refused field
NON_DEFAULT = {
    "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto", "functions": [{"name": "f"}],
    "function_call": "auto", "suffix": "x", "best_of": 2, "use_beam_search": True, "length_penalty": 0.5,
    "response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["a", "b"]},
    "guided_json": {"type": "object"}, "guided_regex": "a+", "guided_choice": ["a"], "guided_grammar": "root ::= 'a'",
    "guided_decoding_backend": "xgrammar", "guided_whitespace_pattern": " ", "structural_tag": "{}",
    "logits_processors": ["os.system"], "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"}, "web_search_options": {}, "store": True,
    "metadata": {"k": "v"}, "service_tier": "flex", "reasoning_effort": "low", "verbosity": "high",
    "documents": [{"title": "t", "text": "x"}], "mm_processor_kwargs": {"a": 1}, "media_io_kwargs": {"image": {}},
    "repetition_detection": {"max_pattern_size": 4}, "moderation": {"model": "x"},
    "prompt_cache_options": {"ttl": "1h"}, "prompt_embeds": "AAAA", "priority": 1, "request_id": "mine",
    "kv_transfer_params": {"a": 1}, "vllm_xargs": {"a": 1}, "return_token_ids": True,
    "stream_options.include_obfuscation": True,
}


def _listed(endpoint: str) -> set[str]:
    return set().union(*FIELDS[endpoint].values())


def _body(endpoint: str, **kw) -> dict:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]} if endpoint == CHAT else \
        {"model": "m", "prompt": "hi"}
    return {**base, **kw}


def _parse(endpoint: str, body: dict):
    return (parse_chat if endpoint == CHAT else parse_completion)(body, LIMITS)


def _with(endpoint: str, field: str, value) -> dict:
    if field.startswith("stream_options."):
        return _body(endpoint, stream=True, stream_options={field.split(".", 1)[1]: value})
    return _body(endpoint, **{field: value})


# ----------------------------------------------------------------------------- the two sets
@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS])
def test_every_listed_field_is_honoured_or_refused_on_its_endpoint(endpoint):
    listed = _listed(endpoint)
    assert len(listed) > 50, "the field list is incomplete"
    third = sorted(f for f in listed if (f in HONOURED) == (f in REFUSED))
    assert not third, f"fields in neither or both sets: {third}"
    wrong = sorted(f for f in listed if endpoint not in (HONOURED.get(f) or REFUSED[f]).endpoints)
    assert not wrong, f"fields of {endpoint} the policy gives to the other endpoint only: {wrong}"


def test_the_policy_declares_only_listed_fields_and_the_sets_are_disjoint():
    listed = _listed(CHAT) | _listed(COMPLETIONS)
    assert not set(HONOURED) & set(REFUSED)
    assert sorted((set(HONOURED) | set(REFUSED)) - listed) == []
    # the 18 fields of the issue, each decided
    issue = ["min_p", "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens", "truncate_prompt_tokens",
             "allowed_token_ids", "bad_words", "use_beam_search", "prompt_logprobs", "return_tokens_as_token_ids",
             "add_generation_prompt", "continue_final_message", "chat_template", "structured_outputs",
             "logits_processors", "stream_options.continuous_usage_stats", "modalities", "audio", "logit_bias"]
    assert all(f in HONOURED or f in REFUSED for f in issue)


def _defined_tests(path: str) -> set[str]:
    tree = ast.parse((TESTS.parent / path).read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_honoured_field_has_a_test_of_its_effect():
    """The sampler-side fields (min_p, stop_token_ids, allowed_token_ids, bad_words) are tested in
    tests/test_serve_processors.py, which comes with the serve-proc branch (issue 22, 4)."""
    assert set(EFFECT_TESTS) == set(HONOURED)
    missing = []
    for field, ref in EFFECT_TESTS.items():
        path, name = ref.split("::")
        if not (TESTS.parent / path).exists() or name not in _defined_tests(path):
            missing.append(f"{field}: {ref}")
    assert not missing, missing


# ----------------------------------------------------------------------------- refusals
REFUSALS = sorted((ep, f) for f, rule in REFUSED.items() for ep in sorted(rule.endpoints))


@pytest.mark.parametrize("endpoint,field", REFUSALS, ids=[f"{e}-{f}" for e, f in REFUSALS])
def test_a_refused_field_with_a_value_is_a_400_naming_it_and_its_default_is_accepted(endpoint, field):
    assert set(NON_DEFAULT) == set(REFUSED)
    with pytest.raises(APIError) as e:
        _parse(endpoint, _with(endpoint, field, NON_DEFAULT[field]))
    assert e.value.status == 400 and e.value.param == field and field in e.value.message
    for inert in REFUSED[field].inert:
        _parse(endpoint, _with(endpoint, field, inert))   # a default asks for nothing: accepted


@pytest.mark.parametrize("field,value,endpoint", [
    ("add_generation_prompt", False, COMPLETIONS), ("include_reasoning", False, COMPLETIONS),
    ("chat_template_kwargs", {"x": 1}, COMPLETIONS), ("top_logprobs", 2, COMPLETIONS),
    ("suffix", "x", CHAT), ("prompt_embeds", "AAAA", CHAT), ("rain_reasoning_parser", "none", COMPLETIONS)])
def test_a_field_of_the_other_endpoint_is_a_400_naming_it(field, value, endpoint):
    with pytest.raises(APIError) as e:
        _parse(endpoint, _body(endpoint, **{field: value}))
    assert e.value.status == 400 and e.value.param == field


@pytest.mark.parametrize("body,param", [
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": 1}}, "stream_options.continuous_usage_stats"),
    ({"prompt_logprobs": 2, "stream": True}, "prompt_logprobs"), ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"), ({"skip_special_tokens": "no"}, "skip_special_tokens"),
    ({"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
    ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
    ({"spaces_between_special_tokens": "x"}, "spaces_between_special_tokens"),
    ({"return_tokens_as_token_ids": "x"}, "return_tokens_as_token_ids"), ({"cache_salt": ""}, "cache_salt"),
    ({"prompt_cache_key": 5}, "prompt_cache_key"), ({"safety_identifier": []}, "safety_identifier"),
    ({"prompt_cache_retention": "forever"}, "prompt_cache_retention"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"), ({"include_reasoning": "no"}, "include_reasoning"),
    ({"echo": 1}, "echo"), ({"add_special_tokens": "no"}, "add_special_tokens")])
def test_bad_values_of_honoured_fields_are_400s_naming_them(body, param):
    with pytest.raises(APIError) as e:
        _parse(CHAT, _body(CHAT, **body))
    assert e.value.status == 400 and e.value.param == param, e.value.message


# ----------------------------------------------------------------------------- effects, through the server
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
M = "m"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from rain_adapter.serve.app import create_app
    from rain_adapter.testing.serve_tiny import build_tiny_serving, tiny_serve_state
    from rain_adapter.testing.server import ServerThread

    root = tmp_path_factory.mktemp("fields")
    model_dir, adapter_dir = build_tiny_serving(root)
    state = tiny_serve_state(model_dir, adapter_dir, model_name=M, db_path=root / "l.sqlite", max_tokens_cap=16,
                             context_length=256)
    srv = ServerThread(create_app(state)).start()
    yield srv, state
    srv.stop()


def _post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.base_url + path, json=body, timeout=60)


def _ok(srv, path: str, body: dict) -> dict:
    r = _post(srv, path, body)
    assert r.status_code == 200, r.text
    return r.json()


def _sse(srv, path: str, body: dict) -> list[dict]:
    r = _post(srv, path, {**body, "stream": True})
    assert r.status_code == 200, r.text
    return [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]


COMP = {"model": M, "prompt": "The answer is", "max_tokens": 12, "temperature": 0, "rain_lambda": 1.0}
CHATB = {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0,
         "rain_lambda": 1.0, "rain_reasoning_parser": "none"}


def _text(body: dict) -> str:
    return body["choices"][0]["text"]


def test_include_stop_str_in_output(served):
    srv, _ = served
    full = _text(_ok(srv, "/v1/completions", COMP))
    stop = full[3:5]
    assert len(stop) == 2 and full.find(stop) == 3, full
    cut = _ok(srv, "/v1/completions", {**COMP, "stop": [stop]})["choices"][0]
    kept = _ok(srv, "/v1/completions", {**COMP, "stop": [stop], "include_stop_str_in_output": True})["choices"][0]
    assert cut["text"] == full[:3] and kept["text"] == full[:5]
    assert (kept["finish_reason"], kept["stop_reason"]) == ("stop", stop)
    kept_body = {**COMP, "stop": [stop], "include_stop_str_in_output": True}
    streamed = "".join(c["choices"][0]["text"] for c in _sse(srv, "/v1/completions", kept_body))
    assert streamed == full[:5]


def test_skip_special_tokens(served):
    """logit_bias forces a special token: skip_special_tokens=true leaves it out (but keeps the thinking
    markers), false keeps it (and no spaces go between special tokens, whatever spaces_between_special_tokens
    says: a fast tokenizer, as in vLLM)."""
    srv, state = served
    tok = state.tokenizer
    user, think = tok.convert_tokens_to_ids("<|User|>"), tok.convert_tokens_to_ids("<think>")
    base = {**COMP, "max_tokens": 3, "logit_bias": {str(user): 100}}
    default = _text(_ok(srv, "/v1/completions", base))
    assert default == "<|User|>" * 3   # absent: the server's default skips only pad / BOS / EOS
    assert _text(_ok(srv, "/v1/completions", {**base, "skip_special_tokens": True})) == ""
    assert _text(_ok(srv, "/v1/completions", {**base, "skip_special_tokens": False})) == "<|User|>" * 3
    for spaces in (True, False):
        assert _text(_ok(srv, "/v1/completions", {**base, "skip_special_tokens": False,
                                                   "spaces_between_special_tokens": spaces})) == "<|User|>" * 3
    marker = {**base, "logit_bias": {str(think): 100}, "skip_special_tokens": True}
    assert _text(_ok(srv, "/v1/completions", marker)) == "<think>" * 3


def test_truncate_prompt_tokens(served):
    srv, state = served
    ids = state.tokenizer("The answer is")["input_ids"]
    cut = _ok(srv, "/v1/completions", {**COMP, "truncate_prompt_tokens": 5})
    alone = _ok(srv, "/v1/completions", {**COMP, "prompt": ids[-5:]})
    assert cut["usage"]["prompt_tokens"] == 5 and _text(cut) == _text(alone) != _text(_ok(srv, "/v1/completions", COMP))
    # a prompt longer than the context is served once cut (and echoed as the tokens the model saw)
    long = _ok(srv, "/v1/completions", {**COMP, "prompt": "x" * 600 + "The answer is", "truncate_prompt_tokens": 5,
                                        "echo": True, "max_tokens": 4})
    assert long["usage"]["prompt_tokens"] == 5 and long["choices"][0]["text"].startswith("er is")
    r = _post(srv, "/v1/completions", {**COMP, "prompt": "x" * 600})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    chat = _ok(srv, "/v1/chat/completions", {**CHATB, "truncate_prompt_tokens": 3})
    assert chat["usage"]["prompt_tokens"] == 3


def _forward(state, ids: list[int], lam: float) -> torch.Tensor:
    with torch.inference_mode():
        state.model.set_lambda(lam)
        return torch.log_softmax(state.model(torch.tensor([ids])).logits[0].double(), -1)


def test_prompt_logprobs_equal_a_forward_pass(served):
    srv, state = served
    ids = state.tokenizer("The answer is")["input_ids"]
    got = _ok(srv, "/v1/completions", {**COMP, "max_tokens": 1, "prompt_logprobs": 2})["choices"][0]["prompt_logprobs"]
    ref = _forward(state, ids, 1.0)
    assert len(got) == len(ids) and got[0] is None
    for t in range(1, len(ids)):
        row = ref[t - 1]
        entry = got[t][str(ids[t])]
        assert entry["logprob"] == pytest.approx(float(row[ids[t]]), abs=1e-4)
        assert entry["rank"] == 1 + int((row > row[ids[t]]).sum())   # its rank in the whole vocabulary
        assert entry["decoded_token"] == state.tokenizer.decode([ids[t]])
        top = row.topk(2).indices.tolist()
        assert len(got[t]) == (2 if ids[t] in top else 3)
        assert [got[t][str(i)]["rank"] for i in top] == [1, 2]   # the k most likely, ranked
    zero = _ok(srv, "/v1/completions", {**COMP, "max_tokens": 1, "prompt_logprobs": 0})["choices"][0]
    assert all(d is None or list(d) == [str(i)] for d, i in zip(zero["prompt_logprobs"], ids))
    assert "prompt_logprobs" not in _ok(srv, "/v1/completions", {**COMP, "max_tokens": 1})["choices"][0]
    chat = _ok(srv, "/v1/chat/completions", {**CHATB, "max_tokens": 1, "prompt_logprobs": 1})
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None
    two = _ok(srv, "/v1/chat/completions", {**CHATB, "max_tokens": 1, "prompt_logprobs": 1, "n": 2})
    assert two["prompt_logprobs"] == chat["prompt_logprobs"]


def test_return_tokens_as_token_ids(served):
    srv, _ = served
    plain = _ok(srv, "/v1/completions", {**COMP, "logprobs": 1})["choices"][0]["logprobs"]
    ids = _ok(srv, "/v1/completions", {**COMP, "logprobs": 1, "return_tokens_as_token_ids": True})["choices"][0]
    lp = ids["logprobs"]
    assert all(t.startswith("token_id:") for t in lp["tokens"]) and lp["token_logprobs"] == plain["token_logprobs"]
    assert lp["text_offset"] == plain["text_offset"]
    assert all(next(iter(top)) == t for t, top in zip(lp["tokens"], lp["top_logprobs"]))
    chat = _ok(srv, "/v1/chat/completions", {**CHATB, "logprobs": True, "top_logprobs": 2,
                                             "return_tokens_as_token_ids": True})["choices"][0]["logprobs"]["content"]
    assert chat and all(c["token"].startswith("token_id:") and
                        all(a["token"].startswith("token_id:") for a in c["top_logprobs"]) for c in chat)


def _rendered_ids(state, messages, **kw) -> list[int]:
    text = state.tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    return state.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_add_generation_prompt(served):
    srv, state = served
    msgs = CHATB["messages"]
    on = _ok(srv, "/v1/chat/completions", CHATB)
    off = _ok(srv, "/v1/chat/completions", {**CHATB, "add_generation_prompt": False})
    want = _rendered_ids(state, msgs, add_generation_prompt=False)
    assert off["usage"]["prompt_tokens"] == len(want) < on["usage"]["prompt_tokens"]
    # the same prompt as a completion gives the same text; chat_template_kwargs says the same
    assert off["choices"][0]["message"]["content"] == _text(_ok(srv, "/v1/completions", {**COMP, "max_tokens": 8,
                                                                                        "prompt": want}))
    kw = _ok(srv, "/v1/chat/completions", {**CHATB, "chat_template_kwargs": {"add_generation_prompt": False}})
    assert kw["choices"][0]["message"]["content"] == off["choices"][0]["message"]["content"]


def test_chat_echo_and_continue_final_message(served):
    srv, state = served
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The ans"}]
    body = {**CHATB, "messages": msgs, "continue_final_message": True}
    cont = _ok(srv, "/v1/chat/completions", body)
    want = _rendered_ids(state, msgs, continue_final_message=True)
    assert cont["usage"]["prompt_tokens"] == len(want)
    same = _text(_ok(srv, "/v1/completions", {**COMP, "max_tokens": 8, "prompt": want}))
    assert cont["choices"][0]["message"]["content"] == same
    echoed = _ok(srv, "/v1/chat/completions", {**body, "echo": True})["choices"][0]["message"]["content"]
    assert echoed == "The ans" + same
    streamed = _sse(srv, "/v1/chat/completions", {**body, "echo": True})
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed if c["choices"]) == echoed
    # echo of a last message that is not the assistant's adds nothing (vLLM's rule)
    plain = _ok(srv, "/v1/chat/completions", CHATB)["choices"][0]["message"]["content"]
    assert _ok(srv, "/v1/chat/completions", {**CHATB, "echo": True})["choices"][0]["message"]["content"] == plain


def test_add_special_tokens(served):
    srv, _ = served
    with_bos = _ok(srv, "/v1/completions", COMP)["usage"]["prompt_tokens"]
    assert _ok(srv, "/v1/completions", {**COMP, "add_special_tokens": False})["usage"]["prompt_tokens"] == with_bos - 1
    chat = _ok(srv, "/v1/chat/completions", CHATB)["usage"]["prompt_tokens"]
    assert _ok(srv, "/v1/chat/completions", {**CHATB, "add_special_tokens": True})["usage"]["prompt_tokens"] == chat + 1


def test_include_reasoning_false_drops_the_thinking(served):
    srv, _ = served
    body = {**CHATB, "rain_reasoning_parser": "deepseek_r1"}
    full = _ok(srv, "/v1/chat/completions", body)["choices"][0]["message"]
    assert full["reasoning_content"]   # the generation prompt opens <think>: the tiny model's text is thinking
    dropped = _ok(srv, "/v1/chat/completions", {**body, "include_reasoning": False})["choices"][0]["message"]
    assert dropped["reasoning_content"] is None and dropped["content"] == full["content"]
    chunks = _sse(srv, "/v1/chat/completions", {**body, "include_reasoning": False})
    assert not any("reasoning_content" in c["choices"][0]["delta"] for c in chunks if c["choices"])
    chunks = _sse(srv, "/v1/chat/completions", body)
    assert any("reasoning_content" in c["choices"][0]["delta"] for c in chunks if c["choices"])


def test_continuous_usage_stats(served):
    srv, _ = served
    chunks = _sse(srv, "/v1/completions", {**COMP, "stream_options": {"include_usage": True,
                                                                      "continuous_usage_stats": True}})
    final = chunks[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 12
    body = [c for c in chunks if c["choices"]]
    counts = [c["usage"]["completion_tokens"] for c in body]
    assert counts == sorted(counts) and counts[-1] == 12 and all(c["usage"]["prompt_tokens"] ==
                                                                  final["usage"]["prompt_tokens"] for c in body)
    plain = _sse(srv, "/v1/completions", {**COMP, "stream_options": {"include_usage": True}})
    assert all(c["usage"] is None for c in plain if c["choices"])
    r = _post(srv, "/v1/completions", {**COMP, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_top_p_near_zero_is_greedy(served):
    srv, _ = served
    greedy = _text(_ok(srv, "/v1/completions", COMP))
    hot = {**COMP, "temperature": 2.0, "seed": 5}
    assert _text(_ok(srv, "/v1/completions", {**hot, "top_p": 1e-6})) == greedy != _text(_ok(srv, "/v1/completions",
                                                                                               hot))


def test_hints_are_type_checked_and_change_nothing(served):
    """prompt_cache_key / prompt_cache_retention / cache_salt / safety_identifier / parallel_tool_calls
    promise no change of the output here (there is no prefix cache and there are no tools): accepted with
    their types, and the answer is the same."""
    srv, _ = served
    plain = _ok(srv, "/v1/chat/completions", CHATB)["choices"][0]["message"]["content"]
    hinted = _ok(srv, "/v1/chat/completions", {**CHATB, "prompt_cache_key": "k", "prompt_cache_retention": "24h",
                                               "cache_salt": "s" * 43, "safety_identifier": "u1",
                                               "parallel_tool_calls": False})
    assert hinted["choices"][0]["message"]["content"] == plain
    r = _post(srv, "/v1/chat/completions", {**CHATB, "cache_salt": 7})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


def test_refusals_through_the_server_name_the_field(served):
    srv, _ = served
    for path, base in (("/v1/chat/completions", CHATB), ("/v1/completions", COMP)):
        for field in ("use_beam_search", "logits_processors", "structured_outputs"):
            r = _post(srv, path, {**base, field: NON_DEFAULT[field]})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    r = _post(srv, "/v1/chat/completions", {**CHATB, "modalities": ["text", "audio"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "modalities"


def test_include_stop_str_in_output_in_continuous_mode(tmp_path):
    """The continuous loop's rows (serve/continuous.py) cut at a stop string the same way."""
    from rain_adapter.serve.app import create_app
    from rain_adapter.serve.continuous import ContinuousScheduler
    from rain_adapter.testing.serve_tiny import build_tiny_serving, tiny_serve_state
    from rain_adapter.testing.server import ServerThread

    model_dir, adapter_dir = build_tiny_serving(tmp_path)
    state = tiny_serve_state(model_dir, adapter_dir, model_name=M, db_path=tmp_path / "l.sqlite", max_tokens_cap=16,
                             max_batch_size=4, context_length=256, batching="continuous")
    with ServerThread(create_app(state)) as srv:
        assert isinstance(state.scheduler, ContinuousScheduler)
        full = _text(_ok(srv, "/v1/completions", COMP))
        stop = full[3:5]
        assert len(stop) == 2 and full.find(stop) == 3, full
        kept = _ok(srv, "/v1/completions", {**COMP, "stop": [stop], "include_stop_str_in_output": True})["choices"][0]
        assert (kept["text"], kept["finish_reason"], kept["stop_reason"]) == (full[:5], "stop", stop)
        assert _text(_ok(srv, "/v1/completions", {**COMP, "stop": [stop]})) == full[:3]


def test_tokenize_counts_what_generation_sees(served):
    """/tokenize takes add_generation_prompt / continue_final_message as chat does: the same token count."""
    srv, _ = served
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The ans"}]
    for extra in ({"continue_final_message": True}, {"add_generation_prompt": False}, {}):
        count = _ok(srv, "/tokenize", {"model": M, "messages": msgs, **extra})["count"]
        assert count == _ok(srv, "/v1/chat/completions", {**CHATB, "messages": msgs, "max_tokens": 1,
                                                            **extra})["usage"]["prompt_tokens"], extra
    r = _post(srv, "/tokenize", {"model": M, "messages": msgs, "continue_final_message": True,
                                 "add_generation_prompt": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


def test_the_serving_docs_name_every_declared_field():
    doc = (TESTS.parent / "docs" / "serving.md").read_text()
    assert [f for f in (*HONOURED, *REFUSED) if f"| `{f}` |" not in doc] == []


def _joined_logprobs(chunks: list[dict]) -> dict:
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        lp = c["choices"][0]["logprobs"] if c["choices"] else None
        for k in out:
            out[k] += (lp or {}).get(k, [])
    return out


def test_streaming_carries_logprobs_and_echo(served):
    """Streamed, a request gets what it gets in one piece: completions logprobs (text_offset included)
    and echo (the prompt first, with its logprobs), chat logprobs."""
    srv, _ = served
    for extra in ({"logprobs": 2}, {"logprobs": 1, "echo": True}, {"echo": True}):
        whole = _ok(srv, "/v1/completions", {**COMP, **extra})["choices"][0]
        chunks = _sse(srv, "/v1/completions", {**COMP, **extra})
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["text"], extra
        if "logprobs" in extra:
            assert _joined_logprobs(chunks) == whole["logprobs"], extra
    assert _sse(srv, "/v1/completions", {**COMP, "echo": True})[0]["choices"][0]["text"] == COMP["prompt"]
    body = {**CHATB, "logprobs": True, "top_logprobs": 2}
    whole = _ok(srv, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    chunks = _sse(srv, "/v1/chat/completions", body)
    assert [e for c in chunks if c["choices"] for e in (c["choices"][0]["logprobs"] or {}).get("content", [])] == whole
    split = _sse(srv, "/v1/chat/completions", {**body, "rain_reasoning_parser": "deepseek_r1"})
    assert [e for c in split if c["choices"] for e in (c["choices"][0]["logprobs"] or {}).get("content", [])] == whole


def test_tokenize_return_token_strs_and_refusals(served):
    srv, state = served
    got = _ok(srv, "/tokenize", {"model": M, "prompt": "ab", "return_token_strs": True})
    assert got["token_strs"] == state.tokenizer.convert_ids_to_tokens(got["tokens"]) and len(got["token_strs"]) == 3
    assert _ok(srv, "/tokenize", {"model": M, "prompt": "ab"})["token_strs"] is None
    for field, value in (("tools", [{"type": "function", "function": {"name": "f"}}]), ("return_token_strs", 1)):
        r = _post(srv, "/tokenize", {"model": M, "prompt": "ab", field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
