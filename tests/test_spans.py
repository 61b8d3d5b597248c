"""Instruction calibration loader and span → token mapping (rain_adapter.merging.spans)."""

from __future__ import annotations

import json

import pytest
import torch

from rain_adapter.testing.fixtures import PLAIN_CHAT_TEMPLATE, make_tokenizer
from rain_adapter.merging.spans import (
    SpanError, build_sample_text, load_instruction_records, prepare_instruction_samples,
)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _rec(prompt="Write a poem about cats. Use no commas.", reason="The user wants a poem.",
         response="Cats sleep all day\nCats purr at night\nThe end", **kw):
    rec = {
        "id": kw.pop("id", 1), "prompt": prompt, "reason": reason, "response": response,
        "related_prompt_list": kw.pop("related", [
            {"instruction_id": "style:poem", "prompt_spans": ["Write a poem about cats"],
             "response_spans": ["Cats sleep all day", "Cats purr at night"], "unrelated_response_spans": []},
            {"instruction_id": "punctuation:no_comma", "prompt_spans": ["Use no commas"],
             "response_spans": [], "unrelated_response_spans": []},
        ]),
        "unrelated_response_spans": kw.pop("unrelated", ["The end"]),
    }
    rec.update(kw)
    return rec


def _decode(tok, s, idx):
    return tok.decode(s.input_ids[idx])


def test_text_and_segments(tok):
    (s,), rep = prepare_instruction_samples([_rec()], tok)
    text = s.text
    assert text.count("<think>") == 1 and text.count("</think>") == 1     # not double-opened
    assert text.endswith("\n</think>\n\nCats sleep all day\nCats purr at night\nThe end")
    # the ids are exactly one tokenisation of the text, BOS once (template renders it)
    assert s.input_ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert s.input_ids[0] == tok.bos_token_id and s.input_ids[1] != tok.bos_token_id
    g0, g1 = s.groups
    assert _decode(tok, s, g0.prompt_tokens) == "Write a poem about cats"
    assert _decode(tok, s, g0.related_tokens) == "Cats sleep all dayCats purr at night"
    assert _decode(tok, s, g0.unrelated_tokens) == "The end"          # sample-level unrelated spans
    # second instruction: no related spans, but the sample-level unrelated spans give it a u
    assert g1.related_tokens.numel() == 0 and _decode(tok, s, g1.unrelated_tokens) == "The end"
    # I strictly in the prompt, R and U strictly after </think>
    close = (s.input_ids == tok.convert_tokens_to_ids("</think>")).nonzero().item()
    for g in s.groups:
        assert int(g.prompt_tokens.max()) < close
        for t in (g.related_tokens, g.unrelated_tokens):
            assert t.numel() == 0 or int(t.min()) > close + 2
    assert rep.spans_found == {"prompt": 2, "related": 2, "unrelated": 1}
    assert rep.pairs_related == 1 and rep.pairs_unrelated == 2


def test_spans_matched_only_in_their_segment_and_all_occurrences(tok):
    rec = _rec(prompt="Say hello twice. Say hello.", reason="Say hello twice means hello hello.",
               response="hello there, hello again",
               related=[{"prompt_spans": ["Say hello"], "response_spans": ["hello"]}], unrelated=["twice"])
    (s,), rep = prepare_instruction_samples([rec], tok)
    g = s.groups[0]
    # both prompt occurrences, none from the reasoning
    assert _decode(tok, s, g.prompt_tokens) == "Say helloSay hello"
    assert g.prompt_tokens.numel() == 2 * len("Say hello")
    # both response occurrences, none from the reasoning / prompt
    assert _decode(tok, s, g.related_tokens) == "hellohello"
    assert int(g.related_tokens.min()) >= s.response_token_start
    # "twice" appears in prompt and reasoning but not in the response: missing, not mis-mapped
    assert rep.spans_missing["unrelated"] == 1 and g.unrelated_tokens.numel() == 0


def test_unrelated_excludes_related_tokens(tok):
    rec = _rec(response="alpha beta gamma", related=[{"prompt_spans": ["poem"], "response_spans": ["beta"],
                                                      "unrelated_response_spans": ["alpha beta"]}],
               unrelated=["gamma"])
    (s,), _ = prepare_instruction_samples([rec], tok)
    g = s.groups[0]
    assert _decode(tok, s, g.related_tokens) == "beta"
    assert not torch.isin(g.unrelated_tokens, g.related_tokens).any()
    assert _decode(tok, s, g.unrelated_tokens) == "alpha gamma"


def test_template_without_think_opens_it_once():
    tok = make_tokenizer(chat_template=PLAIN_CHAT_TEMPLATE)
    text, (p0, p1), r0 = build_sample_text(tok, "Do X.", "thinking", "answer")
    assert text.count("<think>") == 1 and text[p0:p1] == "Do X."
    assert text.endswith("<think>\nthinking\n</think>\n\nanswer") and text[r0:] == "answer"


def test_too_long_is_skipped_and_counted(tok):
    recs = [_rec(id=1), _rec(id=2, response="x" * 500 + " Cats sleep all day")]
    samples, rep = prepare_instruction_samples(recs, tok, max_seq_len=200)
    assert [s.sample_id for s in samples] == [1]
    assert rep.skipped_too_long == 1 and rep.samples_used == 1 and rep.max_tokens > 500
    with pytest.raises(SpanError, match="max_seq_len=20"):
        prepare_instruction_samples(recs, tok, max_seq_len=20)


def test_no_spans_found_is_an_error(tok):
    rec = _rec(related=[{"prompt_spans": ["not in the prompt"], "response_spans": ["nowhere"]}],
               unrelated=["absent"])
    with pytest.raises(SpanError, match="none of the 3 spans was found"):
        prepare_instruction_samples([rec], tok)


def test_max_samples(tok):
    samples, rep = prepare_instruction_samples([_rec(id=i) for i in range(5)], tok, max_samples=2)
    assert rep.records == 2 and len(samples) == 2


def test_bad_file_names_file_line_field(tmp_path):
    p = tmp_path / "calib.jsonl"
    bad = _rec()
    bad["related_prompt_list"][0]["response_spans"] = "not a list"
    p.write_text(json.dumps(_rec()) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(SpanError, match=r"calib\.jsonl:3: field 'related_prompt_list\[0\]\.response_spans'"):
        load_instruction_records(p)
    p.write_text(json.dumps(_rec()) + "\n{oops\n")
    with pytest.raises(SpanError, match=r"calib\.jsonl:2: invalid JSON"):
        load_instruction_records(p)
    p.write_text(json.dumps({"prompt": "x", "related_prompt_list": []}) + "\n")
    with pytest.raises(SpanError, match=r"calib\.jsonl:1: field 'response'"):
        load_instruction_records(p)
    with pytest.raises(SpanError, match="not found"):
        load_instruction_records(tmp_path / "missing.jsonl")


def test_shared_instruction_set(tok):
    from rain_adapter.merging.spans import default_instruction_calib_path

    path = default_instruction_calib_path()  # packaged (tests/test_packaged_data.py)
    records = load_instruction_records(path)
    assert len(records) == 365
    samples, rep = prepare_instruction_samples(path, tok, max_samples=12, max_seq_len=4096)
    assert rep.spans_missing == {"prompt": 0, "related": 0, "unrelated": 0}
    assert rep.samples_used + rep.skipped_too_long + rep.skipped_no_spans == 12
    assert rep.samples_used >= 6
    for s in samples:
        for g in s.groups:
            assert int(g.prompt_tokens.max()) < s.response_token_start
            for t in (g.related_tokens, g.unrelated_tokens):
                assert t.numel() == 0 or int(t.min()) >= s.response_token_start
