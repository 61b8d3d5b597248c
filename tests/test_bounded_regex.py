"""User-supplied regexes cannot hang (issue 22, 2): ``spec:regex`` checks and the ``regex:`` answer
extractor run with a time bound, so a catastrophic pattern on a hostile answer ends within about a
second as an *unscored* check or answer with the reason; a pattern that is too long or too large is
refused when the prompts file is loaded, naming the row and the field."""

from __future__ import annotations

import json
import time

import pytest

from rain_adapter.evaluation import answers as A
from rain_adapter.evaluation import scoring as Sc
from rain_adapter.evaluation import sweep as S
from rain_adapter.evaluation.bounded_regex import (MAX_PATTERN_CHARS, TIMEOUT_S, RegexRefused, RegexTimeout,
                                                   bounded_search, compile_bounded)
from rain_adapter.evaluation.registry import CheckRegistry

#: the issue's pattern (catastrophic for ``re``) and one the ``regex`` engine cannot shortcut either
ISSUE_REDOS = (r"^(a+)+b$", "a" * 30)
HARD_REDOS = (r"^(a|aa)+$", "a" * 60 + "!")


@pytest.fixture(autouse=True, scope="module")
def _warm():
    """Import the check registries (lm-eval's) before anything is timed."""
    Sc.follow_instructions([("punctuation:no_comma", {}), ("spec:regex", {"pattern": "x"})], "y")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("pattern,text", [ISSUE_REDOS, HARD_REDOS])
def test_a_catastrophic_search_ends_within_a_second(pattern, text):
    t0 = time.perf_counter()
    try:
        found = bounded_search(pattern, text)
        assert found is None
    except RegexTimeout as e:
        assert "ran over" in str(e)
    assert time.perf_counter() - t0 < 1.0


def test_the_hard_pattern_times_out_and_ordinary_ones_match():
    with pytest.raises(RegexTimeout):
        bounded_search(*HARD_REDOS)
    assert bounded_search(r"(?<=x)\d+", "x12").group(0) == "12"
    assert bounded_search("^the", "The cat", "i") is not None
    assert compile_bounded("a", "") is compile_bounded("a", "")  # compiled once


@pytest.mark.parametrize("pattern,why", [
    ("(", "does not compile"),
    ("a" * (MAX_PATTERN_CHARS + 1), f"at most {MAX_PATTERN_CHARS}"),
    ("a{4294967294}", "too large once compiled"),
    ("(?:a{65535}){65535}", "too large once compiled"),
    ("(" * 600 + "a" + ")" * 600, "does not compile"),
])
def test_refused_patterns_are_value_errors_that_say_why(pattern, why):
    t0 = time.perf_counter()
    with pytest.raises(RegexRefused, match=why):
        compile_bounded(pattern)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("pattern,text", [ISSUE_REDOS, HARD_REDOS])
def test_spec_regex_check_is_unscored_within_a_second(pattern, text):
    t0 = time.perf_counter()
    ok, res = Sc.follow_instructions([("spec:regex", {"pattern": pattern, "where": "response"})], text,
                                     registry=CheckRegistry())
    assert time.perf_counter() - t0 < 1.0
    if pattern == HARD_REDOS[0]:
        assert ok is None and res[0].ok is None and res[0].error.startswith("RegexTimeout: ")
    else:
        assert res[0].ok is False


def test_regex_answer_extractor_is_unscored_within_a_second():
    row = {"prompt": "p", "answer": "a", "answer_extract": f"regex:{HARD_REDOS[0]}"}
    t0 = time.perf_counter()
    s = Sc.score_response(row, "thinking</think>" + HARD_REDOS[1])
    assert time.perf_counter() - t0 < 1.0
    assert s["correct"] is None
    assert s["unscored"][0]["check"] == f"answer:regex:{HARD_REDOS[0]}"
    assert s["unscored"][0]["reason"].startswith("RegexTimeout: ")
    t0 = time.perf_counter()
    assert not A.answer_correct(ISSUE_REDOS[1], "a", f"regex:{ISSUE_REDOS[0]}")
    assert time.perf_counter() - t0 < 1.0


def test_a_prompts_file_with_redos_checks_scores_them_unscored(tmp_path):
    """rain sweep / rain tune: the file loads (the patterns compile), the hostile rows end unscored."""
    rows = [{"prompt": "p0", "instruction_id_list": ["spec:regex"], "kwargs": [{"pattern": HARD_REDOS[0]}]},
            {"prompt": "p1", "instruction_id_list": ["spec:regex"], "kwargs": [{"pattern": ISSUE_REDOS[0]}]},
            {"prompt": "p2", "instruction_id_list": ["spec:regex"], "kwargs": [{"pattern": "^a"}],
             "answer": "a", "answer_extract": f"regex:{HARD_REDOS[0]}"}]
    got = S.load_prompts(_write(tmp_path / "p.jsonl", rows))
    t0 = time.perf_counter()
    scores = S.score_rows(got, [HARD_REDOS[1], ISSUE_REDOS[1], HARD_REDOS[1]])
    assert time.perf_counter() - t0 < 2.5  # two timeouts of TIMEOUT_S and two quick searches
    assert TIMEOUT_S <= 0.5
    assert scores[0]["follow_all"] is None and scores[0]["unscored"][0]["reason"].startswith("RegexTimeout")
    assert scores[1]["follow_all"] is False and not scores[1]["unscored"]
    assert scores[2]["follow_all"] is True and scores[2]["correct"] is None
    assert scores[2]["unscored"][0]["reason"].startswith("RegexTimeout")
    agg = S.evaluate_rows(got, [HARD_REDOS[1], ISSUE_REDOS[1], HARD_REDOS[1]])
    assert agg["unscored"] == 2 and agg["n_compliance"] == 2


@pytest.mark.parametrize("kw,why", [
    ({"pattern": "x" * (MAX_PATTERN_CHARS + 1)}, "at most"),
    ({"pattern": "(?:a{1000}){1000}"}, "too large once compiled"),
])
def test_a_refused_pattern_fails_at_load_naming_row_and_field(tmp_path, kw, why):
    rows = [{"prompt": "ok", "instruction_id_list": ["punctuation:no_comma"]},
            {"prompt": "bad", "instruction_id_list": ["spec:regex"], "kwargs": [kw]}]
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=rf"p\.jsonl: row 1: spec:regex: kwargs field 'pattern': .*{why}"):
        S.load_prompts(_write(tmp_path / "p.jsonl", rows))
    rows = [{"prompt": "x", "answer": "1", "answer_extract": "regex:" + kw["pattern"]}]
    with pytest.raises(ValueError, match=rf"row 0: field 'answer_extract': .*{why}"):
        S.load_prompts(_write(tmp_path / "p.jsonl", rows))
    assert time.perf_counter() - t0 < 1.0
