"""IFEval-style checks, thinking-format check and answer correctness (rain_adapter.evaluation.checks)."""

from __future__ import annotations

import math

import pytest

from rain_adapter.evaluation import checks as C
from rain_adapter.evaluation import scoring as Sc


@pytest.fixture(autouse=True)
def _ours(monkeypatch):
    monkeypatch.setenv("RAIN_CHECKS", "ours")  # test our implementation even if lm-eval is installed


@pytest.mark.parametrize("iid,kwargs,good,bad", [
    ("change_case:english_capital", {}, "THE ANSWER IS 632.", "The answer is 632."),
    ("change_case:english_lowercase", {}, "the answer is 632.", "The answer is 632."),
    ("detectable_format:title", {}, "<<result>>\nThe answer is 5.", "The answer is 5."),
    ("detectable_format:title", {}, "<<a b>> x", "<<>> x"),
    ("startend:quotation", {}, '"The answer is 5."', 'The answer is "5".'),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "It is 5. Any other questions?",
     "Any other questions? It is 5."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "It is 5.\nP.S. I hope this helps.",
     "It is 5. PS hi"),
    ("punctuation:no_comma", {}, "no commas here", "a, b"),
    ("keywords:existence", {"keywords": ["apple", "pie"]}, "Apple pie.", "apple tart"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "good words", "a bad word"),
    ("keywords:frequency", {"keyword": "x", "frequency": 2, "relation": "at least"}, "x x", "x"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"}, "z", "zzz"),
    ("length_constraints:number_words", {"num_words": 3, "relation": "less than"}, "one two", "one two three"),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"}, "A b. C d.", "A b c"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "a\n***\nb", "a b"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[a] and [b]", "[a] only"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 1}, "*hi* there", "hi there"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b", "* a"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{a: 1"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "yes"),
    ("combination:two_responses", {}, "one\n******\ntwo", "one"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Say hi. Hi!", "Hi!"),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "THE END IS near", "The end"),
])
def test_check_pass_fail(iid, kwargs, good, bad):
    assert C.check(iid, kwargs, good) is True
    assert C.check(iid, kwargs, bad) is False


def test_thinking_is_stripped_before_compliance():
    resp = "let me think, in lower case\n</think>\n\nTHE ANSWER IS 7."
    assert C.check("change_case:english_capital", {}, resp)
    assert C.check("punctuation:no_comma", {}, resp)  # the comma is inside the reasoning
    assert not C.check("change_case:english_capital", {}, "THINKING\n</think>\n\n")  # empty answer fails


def test_unknown_instruction_raises_and_none_kwargs_dropped():
    with pytest.raises(C.UnsupportedInstruction):
        C.check("made:up", {}, "x")
    assert C.check("startend:end_checker", {"end_phrase": "bye", "unused": None}, "ok bye")


@pytest.mark.parametrize("text,ok", [
    ("1 + 2 = 3\n</think>\n\nThe answer is 3.", True),
    ("<think>\nsteps\n</think>\n\nanswer", True),
    ("The answer is 3.", False),                              # no </think>
    ("\n</think>\n\nThe answer is 3.", False),                # empty reasoning
    ("steps\n</think>\n\n", False),                           # no answer
    ("a\n</think>\nb\n</think>\nc", False),                   # two closings
    ("a </think> b <think> c", False),                        # <think> after </think>
])
def test_think_format(text, ok):
    assert C.think_format_ok(text) is ok


def test_answer_correct_uses_last_number_after_thinking():
    assert C.answer_correct("7 + 5 = 12\n</think>\n\nThe answer is 632.", 632)
    assert not C.answer_correct("So 632.\n</think>\n\nThe answer is 631.", "632")
    assert C.answer_correct("<<result>>\nTHE ANSWER IS 1,851.", "1851")
    assert not C.answer_correct("no number", 3)


def test_score_and_aggregate():
    rows = [
        {"prompt": "p", "instruction_id_list": ["change_case:english_capital"], "kwargs": [{}], "answer": "3"},
        {"prompt": "p", "instruction_id_list": ["made:up"], "kwargs": [{}]},
    ]
    s0 = Sc.score_response(rows[0], "x\n</think>\n\nTHE ANSWER IS 3.")
    assert s0["follow_all"] and s0["think_ok"] and s0["correct"]
    s1 = Sc.score_response(rows[1], "no thinking")
    assert s1["follow_all"] is None and s1["follow_each"] == [None] and s1["correct"] is None
    agg = Sc.aggregate([s0, s1])
    assert agg["compliance"] == 1.0 and agg["format_validity"] == 0.5 and agg["accuracy"] == 1.0
    assert agg["thinking_rate"] == 0.5 and agg["n"] == 2
    assert math.isnan(Sc.aggregate([s1])["compliance"])


def test_world_responses_are_checkable():
    """Every compliant response the world's generator writes passes its own check; plain ones fail."""
    import random

    from rain_adapter.demo import data as D

    for iid in D.INSTRUCTION_IDS:
        for seed in range(3):
            inst = D.make_instruction(random.Random(seed), iid)
            plain = D.answer_sentence(632)
            resp = D.apply_instruction(inst, plain)[0]
            assert C.check(iid, inst.kwargs, resp), (iid, resp)
            assert not C.check(iid, inst.kwargs, plain), (iid, plain)


def test_follow_instructions_is_the_one_compliance():
    """Prompt-level compliance over the scorable instructions; unscorable ones are None with a reason."""
    ok, res = Sc.follow_instructions([("punctuation:no_comma", {}), ("made:up", {}),
                                      ("startend:end_checker", {"end_phrase": 5})], "r</think>no commas")
    assert ok is True and [r.ok for r in res] == [True, None, None]
    assert "no checker" in res[1].error and "bad kwargs" in res[2].error
    assert Sc.follow_instructions([], "x") == (None, [])
    assert Sc.follow_instructions([("made:up", {})], "x")[0] is None
    assert Sc.follow_instructions([("punctuation:no_comma", None)], "a, b")[0] is False
    nth = {"num_paragraphs": 1, "nth_paragraph": -5, "first_word": "a"}  # an index out of range
    assert Sc.follow_instructions([("length_constraints:nth_paragraph_first_word", nth)], "a b")[1][0].ok is None
    # score_response is defined through it
    row = {"instruction_id_list": ["punctuation:no_comma", "made:up"], "kwargs": [{}, {}]}
    s = Sc.score_response(row, "r</think>a, b")
    assert s["follow_all"] is False and s["follow_each"] == [False, None]


def test_supported_ids_and_lm_eval_bad_kwargs(monkeypatch):
    assert C.supported_ids() == frozenset(C.SUPPORTED_IDS)

    class Inst:  # the shape of an lm-eval instruction class
        def __init__(self, iid):
            pass

        def build_description(self, *, n: int):
            pass

        def get_instruction_args(self):
            return {}

        def check_following(self, text):
            return True

    monkeypatch.setattr(C, "_lm_eval_registry", lambda: {"x:only_lm_eval": Inst})
    assert "x:only_lm_eval" in C.supported_ids()
    assert C.check("x:only_lm_eval", {"n": 1}, "text")
    with pytest.raises(C.UnsupportedInstruction, match="bad kwargs"):
        C.check("x:only_lm_eval", {"m": 1}, "text")
