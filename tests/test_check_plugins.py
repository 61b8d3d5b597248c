"""Checks as a plug-in (issue 15): one check registry for sweeps and the server — Python check modules,
declarative ``spec:*`` checks, unknown ids an error — scoring that never crashes a run, responses on
disk before scoring, and pluggable answer extraction."""

from __future__ import annotations

import csv
import json
import re
import sqlite3
import sys
import types

import pytest

from rain_adapter.evaluation import answers as A
from rain_adapter.evaluation import checks as C
from rain_adapter.evaluation import scoring as Sc
from rain_adapter.evaluation import sweep as S
from rain_adapter.evaluation.registry import CheckRegistry, registry_with
from rain_adapter.evaluation.specs import SPEC_IDS, SpecError

MODULE = '''
def _no_digits(text):
    return not any(c.isdigit() for c in text)


def explode(text):
    raise RuntimeError("kaboom")


def ends_with_bang(text, response):
    """Gets the answer and the whole response; unscorable without an answer."""
    if not text:
        return None
    return text.rstrip().endswith("!") and "</think>" in response


def repeats_first_word(text, prompt, *, lower=True):
    first = prompt.split()[0]
    return (first.lower() in text.lower()) if lower else (first in text)


def answer_after_colon(text):
    return text.rsplit(":", 1)[-1].strip() if ":" in text else None


RAIN_CHECKS = {"my:no_digits": _no_digits, "my:explode": explode}
'''


@pytest.fixture
def mychecks(tmp_path, monkeypatch):
    """``mychecks.py`` on sys.path (and out of sys.modules again afterwards); returns its directory."""
    d = tmp_path / "mods"
    d.mkdir()
    (d / "mychecks.py").write_text(MODULE)
    (d / "otherchecks.py").write_text("def shout(text):\n    return text.isupper()\n")
    monkeypatch.syspath_prepend(str(d))
    for name in ("mychecks", "otherchecks"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield d
    for name in ("mychecks", "otherchecks"):
        sys.modules.pop(name, None)


# ----------------------------------------------------------------------------- independent expectations
def _answer(resp: str) -> str:
    return resp.rsplit("</think>", 1)[-1].strip()


def _words(s: str) -> int:
    return len(re.findall(r"\w+(?:['’-]\w+)*", s))


EXPECT = {  # (check id, kwargs) -> the verdict on a response, written here without the library
    "my:no_digits": lambda resp, prompt, kw: not re.search(r"\d", _answer(resp)),
    "mychecks:ends_with_bang": lambda resp, prompt, kw: (_answer(resp).endswith("!") and "</think>" in resp)
    if _answer(resp) else None,
    "mychecks:repeats_first_word": lambda resp, prompt, kw: prompt.split()[0].lower() in _answer(resp).lower(),
    "spec:regex": lambda resp, prompt, kw: bool(re.search(kw["pattern"], _answer(resp),
                                                          re.I if "i" in kw.get("flags", "") else 0)),
    "spec:word_count": lambda resp, prompt, kw: kw.get("min", 0) <= _words(_answer(resp)) <= kw.get("max", 10 ** 9),
}

ROW_CHECKS = [("my:no_digits", {}), ("mychecks:ends_with_bang", {}), ("mychecks:repeats_first_word", {}),
              ("spec:regex", {"pattern": "^the", "flags": "i"}), ("spec:word_count", {"min": 2, "max": 4})]


def _canned(prompt: str, lam: float) -> str:
    """A response that depends on the prompt and λ, so every check flips somewhere across the grid."""
    word = prompt.split()[0]
    body = {0.0: f"The {word} is 12", 0.5: f"the {word} wins!", 1.0: "Nothing to say here at all!"}[lam]
    return f"reasoning 7</think>{body}" if (len(prompt) + int(lam * 2)) % 2 else body


def _expected(row: dict, resp: str) -> bool | None:
    verdicts = [EXPECT[i](resp, row["prompt"], kw) for i, kw in zip(row["instruction_id_list"], row["kwargs"])]
    scored = [v for v in verdicts if v is not None]
    return all(scored) if scored else None


def _rows(n: int = 4) -> list[dict]:
    prompts = ["Apples grow on trees.", "Bananas are long", "Cherries?", "Dates are sweet, said Ann."][:n]
    return [{"prompt": p, "instruction_id_list": [i for i, _ in ROW_CHECKS], "kwargs": [kw for _, kw in ROW_CHECKS]}
            for p in prompts]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def fake_generate(monkeypatch):
    def gen(model, tok, prompts, *, lambdas=None, **kw):
        return [_canned(p, lam) for p, lam in zip(prompts, lambdas)]

    monkeypatch.setattr(S, "generate_responses", gen)
    return gen


# ----------------------------------------------------------------------------- sweep
def test_custom_module_and_spec_rows_scored_by_sweep(mychecks, tmp_path, fake_generate):
    reg = registry_with(["mychecks"])
    assert {"my:no_digits", "my:explode"} <= reg.known_ids()
    rows = S.load_prompts(_write(tmp_path / "p.jsonl", _rows()), registry=reg)
    lambdas = [0.0, 0.5, 1.0]
    resp_path = tmp_path / "responses.jsonl"
    unscored: list = []
    recs = S.sweep_attached(types.SimpleNamespace(), None, rows, lambdas, method="m", progress=False,
                            responses_path=resp_path, registry=reg, unscored_out=unscored)
    written = [json.loads(x) for x in resp_path.read_text().splitlines()]
    assert len(written) == len(rows) * len(lambdas)
    assert {(w["lambda"], w["index"]) for w in written} == {(lam, i) for lam in lambdas for i in range(len(rows))}
    seen_true = seen_false = False
    for rec, lam in zip(recs, lambdas):
        resps = [_canned(r["prompt"], lam) for r in rows]
        exp = [_expected(r, x) for r, x in zip(rows, resps)]
        scored = [e for e in exp if e is not None]
        assert rec["n_compliance"] == len(scored) and rec["n"] == len(rows) == rec["n_format"]
        assert rec["compliance"] == pytest.approx(sum(scored) / len(scored))
        assert S.evaluate_rows(rows, resps, registry=reg)["compliance"] == rec["compliance"]
        seen_true |= any(scored)
        seen_false |= not all(scored)
        # instruction level: every check on every row, against the expectations written above
        each = [EXPECT[i](x, r["prompt"], kw) for r, x in zip(rows, resps) for i, kw in ROW_CHECKS]
        each = [e for e in each if e is not None]
        assert rec["instruction_level"] == pytest.approx(sum(each) / len(each))
    assert seen_true and seen_false  # the grid exercises both verdicts
    # ends_with_bang returns None on an empty answer: unscored with a reason, not non-compliant
    s = S.score_rows(rows[:1], ["thinking only</think>"], registry=reg)[0]
    assert s["follow_each"][1] is None and "returned None" in s["unscored"][0]["reason"]


def test_module_by_path_registers_public_functions(tmp_path):
    f = tmp_path / "pathchecks.py"
    f.write_text("def short(text, max_chars=10):\n    return len(text) <= max_chars\n\ndef _hidden(text):\n"
                 "    return True\n")
    reg = CheckRegistry()
    assert reg.register_module(str(f)) == ["pathchecks:short"]
    assert reg.check("pathchecks:short", {"max_chars": 3}, "r</think>abc") is True
    assert reg.check("pathchecks:short", {"max_chars": 3}, "r</think>abcd") is False
    assert not reg.known("pathchecks:_hidden")
    with pytest.raises(ValueError, match="built in"):
        reg.register("punctuation:no_comma", lambda t: True)
    with pytest.raises(ValueError, match="--checks nosuch_module_xyz"):
        registry_with(["nosuch_module_xyz"])


def test_unknown_ids_are_an_error_naming_file_and_ids(tmp_path, mychecks):
    rows = [{"prompt": "a", "instruction_id_list": ["nosuch:thing", "punctuation:no_comma"]},
            {"prompt": "b", "instruction_id_list": ["no_such_module_abc:fn"]},
            {"prompt": "c", "instruction_id_list": ["otherchecks:shout", "spec:nope"]},
            {"prompt": "d", "instruction_id_list": ["punctuation:no_comma", "spec:json"]}]
    p = _write(tmp_path / "ids.jsonl", rows)
    reg = CheckRegistry()
    with pytest.raises(ValueError, match=r"ids\.jsonl: 3 row\(s\).*(nosuch:thing|no_such_module_abc:fn|spec:nope) ×1"
                                         r".*--skip-unknown") as ei:
        S.load_prompts(p, registry=reg)
    msg = str(ei.value)
    assert all(i in msg for i in ("nosuch:thing", "no_such_module_abc:fn", "spec:nope"))
    assert "otherchecks:shout" not in msg  # a module:function id imports in a sweep
    with pytest.warns(UserWarning, match="3 row"):
        got = S.load_prompts(p, skip_unknown=True, registry=reg)
    resps = ["x</think>no commas", "x</think>B", "x</think>LOUD", 'x</think>{"a": 1}']
    agg = S.evaluate_rows(got, resps, registry=reg)
    # row a: no_comma scored; b: nothing known; c: shout scored; d: both scored
    assert agg["n_compliance"] == 3 and agg["compliance"] == 1.0 and agg["unscored"] == 3


def test_invalid_spec_kwargs_fail_at_load_naming_file_row_and_field(tmp_path, mychecks):
    cases = [({}, "pattern"), ({"pattern": "(unclosed"}, "pattern"), ({"pattern": "a", "color": "red"}, "color"),
             ({"pattern": "a", "flags": "x"}, "flags")]
    for kw, field in cases:
        rows = [{"prompt": "ok", "instruction_id_list": ["punctuation:no_comma"]},
                {"prompt": "bad", "instruction_id_list": ["punctuation:no_comma", "spec:regex"], "kwargs": [{}, kw]}]
        with pytest.raises(ValueError, match=rf"bad\.jsonl: row 1: spec:regex: kwargs field '{field}'"):
            S.load_prompts(_write(tmp_path / "bad.jsonl", rows))
    for iid, kw, field in [("spec:word_count", {}, "min"), ("spec:word_count", {"min": 5, "max": 2}, "max"),
                           ("spec:contains", {"text": "a", "any": ["b"]}, "text"), ("spec:equals", {}, "text"),
                           ("spec:char_count", {"min": "3"}, "min"), ("my:no_digits", {"oops": 1}, "oops")]:
        rows = [{"prompt": "bad", "instruction_id_list": [iid], "kwargs": [kw]}]
        with pytest.raises(ValueError, match=rf"row 0: {iid}: kwargs field '{field}'"):
            S.load_prompts(_write(tmp_path / "bad.jsonl", rows), registry=registry_with(["mychecks"]))
    rows = [{"prompt": "x", "answer": "1", "answer_extract": "nope"}]
    with pytest.raises(ValueError, match="row 0: field 'answer_extract'.*unknown answer extractor 'nope'"):
        S.load_prompts(_write(tmp_path / "bad.jsonl", rows))
    for how, why in [(5, "answer extractor must be a name \\(a string\\), got int 5"),
                     ("mychecks:nosuch",
                      "answer extractor 'mychecks:nosuch': module 'mychecks' has no function 'nosuch'")]:
        rows = [{"prompt": "x", "answer": "1", "answer_extract": how}]
        with pytest.raises(ValueError, match=rf"bad\.jsonl: row 0: field 'answer_extract': {why}"):
            S.load_prompts(_write(tmp_path / "bad.jsonl", rows))


@pytest.mark.parametrize("iid,kw,good,bad", [
    ("spec:regex", {"pattern": r"^\d+$"}, "42", "4 2"),
    ("spec:regex", {"pattern": "secret", "where": "response"}, "secret plan</think>ok", "plan</think>ok"),
    ("spec:regex", {"pattern": "sorry", "flags": "i", "must_match": False}, "fine", "SORRY"),
    ("spec:contains", {"any": ["cat", "dog"]}, "a Dog", "a bird"),
    ("spec:contains", {"all": ["cat", "dog"], "case_sensitive": True}, "cat dog", "cat Dog"),
    ("spec:not_contains", {"text": "As an AI"}, "Sure.", "as an ai, no"),
    ("spec:json", {"required_keys": ["a"]}, '```json\n{"a": 1}\n```', '{"b": 1}'),
    ("spec:word_count", {"max": 3}, "one two three", "one two three four"),
    ("spec:sentence_count", {"min": 2}, "One. Two.", "One."),
    ("spec:paragraph_count", {"min": 2, "max": 2}, "a\n\nb", "a\nb"),
    ("spec:line_count", {"max": 1}, "a", "a\nb"),
    ("spec:char_count", {"min": 3, "max": 3}, "abc", "ab"),
    ("spec:startswith", {"text": "Answer:"}, "answer: 5", "5"),
    ("spec:endswith", {"text": "Bye.", "case_sensitive": True}, "ok Bye.", "ok bye."),
    ("spec:equals", {"text": "Yes"}, "  yes ", "yes!"),
])
def test_spec_kinds(iid, kw, good, bad):
    reg = CheckRegistry()
    reg.validate(iid, kw)
    assert reg.check(iid, kw, good) is True
    assert reg.check(iid, kw, bad) is False


def test_every_spec_kind_is_known_and_ifeval_unchanged():
    reg = CheckRegistry()
    assert set(SPEC_IDS) <= reg.known_ids() and C.supported_ids() <= reg.known_ids()
    assert len(SPEC_IDS) == 12
    with pytest.raises(SpecError) as ei:
        reg.validate("spec:regex", {"pattern": "["})
    assert ei.value.field == "pattern"
    # follow_instructions goes through the registry: IFEval ids as before, spec ids too
    ok, res = Sc.follow_instructions([("punctuation:no_comma", {}), ("spec:word_count", {"max": 2})],
                                     "r, s</think>two words")
    assert ok is True and [r.ok for r in res] == [True, True]


# ----------------------------------------------------------------------------- a check that fails
def test_a_check_that_raises_is_unscored_and_the_csv_has_the_scored_n(mychecks, tmp_path, fake_generate):
    reg = registry_with(["mychecks"])
    rows = [{"prompt": f"Apple {i}", "instruction_id_list": ["my:explode"] if i % 2 else ["my:no_digits"],
             "kwargs": [{}]} for i in range(4)]
    unscored: list = []
    recs = S.sweep_attached(types.SimpleNamespace(), None, rows, [0.0, 0.5], method="m", progress=False,
                            registry=reg, unscored_out=unscored)
    for rec in recs:
        assert rec["n"] == 4 and rec["n_compliance"] == 2 and rec["unscored"] == 2
    assert {u["reason"] for u in unscored} == {"RuntimeError: kaboom"} and len(unscored) == 4
    summary = S.summarize_unscored(unscored)
    assert summary["total"] == 4 and summary["reasons"][0]["count"] == 4
    assert summary["reasons"][0]["examples"][0] == {"method": "m", "lambda": 0.0, "index": 1}
    out = S.write_csv(recs, tmp_path / "sweep.csv")
    got = list(csv.DictReader(out.open()))
    assert [int(r["n_compliance"]) for r in got] == [2, 2] and [int(r["n"]) for r in got] == [4, 4]
    assert all(int(r["n_compliance"]) < int(r["n"]) and int(r["unscored"]) == 2 for r in got)
    assert "n_c" in S.format_table(recs)
    # an extractor that raises leaves accuracy unscored, with its reason
    row = {"prompt": "p", "answer": "3", "answer_extract": "mychecks:explode"}
    s = S.score_rows([row], ["x</think>3"])[0]
    assert s["correct"] is None and s["unscored"][0]["reason"] == "RuntimeError: kaboom"


def test_responses_are_on_disk_before_scoring(tmp_path, fake_generate, monkeypatch):
    def broken(*a, **k):
        raise MemoryError("scoring blew up")

    monkeypatch.setattr(S, "score_rows", broken)
    rows = [{"prompt": "Apple pie", "instruction_id_list": [], "kwargs": []}]
    path = tmp_path / "responses.jsonl"
    with pytest.raises(MemoryError):
        S.sweep_attached(types.SimpleNamespace(), None, rows, [0.0, 1.0], method="m", progress=False,
                         responses_path=path)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["response"] for x in lines] == [_canned("Apple pie", 0.0), _canned("Apple pie", 1.0)]


def test_sweep_cli_with_checks_module_and_answer_extract(mychecks, tmp_path, fake_generate, monkeypatch, capsys):
    from rain_adapter.cli.main import main
    from rain_adapter.runtime.model import RainAdapter

    monkeypatch.setattr(S, "load_model", lambda *a, **k: (object(), None))
    monkeypatch.setattr(RainAdapter, "attach", lambda model, ad, **k: types.SimpleNamespace(detach=lambda: None))
    rows = [{"prompt": "The cat", "instruction_id_list": ["my:no_digits", "my:explode"], "kwargs": [{}, {}],
             "answer": "wins!", "answer_extract": "exact"},
            {"prompt": "Bananas", "instruction_id_list": ["spec:regex"], "kwargs": [{"pattern": "is"}], "answer": "12"}]
    prompts = _write(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    rc = main(["sweep", "--model", "m", "--adapter", str(tmp_path / "ad"), "--lambdas", "0,0.5", "--prompts",
               str(prompts), "--out", str(out), "--checks", str(mychecks / "mychecks.py"), "--answer-extract",
               "mychecks:answer_after_colon", "--quiet"])
    assert rc == 0
    got = list(csv.DictReader((out / "sweep.csv").open()))
    assert [int(r["n_compliance"]) for r in got] == [2, 2] and [int(r["n_accuracy"]) for r in got] == [2, 2]
    for r, lam in zip(got, (0.0, 0.5)):
        a, b = _canned("The cat", lam), _canned("Bananas", lam)
        comp = [not re.search(r"\d", _answer(a)), bool(re.search("is", _answer(b)))]
        acc = [_answer(a).casefold() == "wins!", None]  # row 2: no colon in the answer -> extractor None
        assert float(r["compliance"]) == pytest.approx(sum(comp) / 2)
        assert float(r["accuracy"]) == pytest.approx(sum(map(bool, acc)) / 2)
    assert len((out / "responses.jsonl").read_text().splitlines()) == 4
    summary = json.loads((out / "unscored.json").read_text())
    assert summary["total"] == 2 and summary["reasons"][0]["reason"] == "RuntimeError: kaboom"
    text = capsys.readouterr().out
    assert "unscored: 2 check(s)" in text and "kaboom" in text
    rc = main(["sweep", "--model", "m", "--adapter", "x", "--prompts", str(prompts), "--out", str(out),
               "--answer-extract", "regex:(", "--quiet"])
    assert rc == 2 and "does not compile" in capsys.readouterr().err


@pytest.mark.parametrize("stem,body,why", [
    ("badlist_checks", "RAIN_CHECKS = [1]\n", "RAIN_CHECKS must be a dict {id: function}, got a list [1]"),
    ("badfn_checks", "RAIN_CHECKS = {'bad:one': 1}\n", "RAIN_CHECKS['bad:one'] must be a function, got 1"),
    ("badkey_checks", "RAIN_CHECKS = {3: len}\n", "RAIN_CHECKS key 3 is not a non-empty string id"),
])
def test_sweep_cli_bad_checks_module_is_a_one_line_error(tmp_path, monkeypatch, capsys, stem, body, why):
    """What a --checks module holds is user input: a RAIN_CHECKS that is not a {id: function} dict
    (here a list) is exit 2 with one line naming the module and its file, not a TypeError traceback,
    and nothing is loaded or generated."""
    from rain_adapter.cli.main import main

    monkeypatch.delenv("RAIN_DEBUG", raising=False)
    monkeypatch.setattr(S, "load_model", lambda *a, **k: pytest.fail("a bad --checks module must fail first"))
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "x", "instruction_id_list": ["punctuation:no_comma"]}])
    f = tmp_path / f"{stem}.py"
    f.write_text(body)
    assert stem not in sys.modules
    try:
        rc = main(["sweep", "--model", "m", "--adapter", "x", "--prompts", str(prompts), "--out",
                   str(tmp_path / "out"), "--checks", str(f), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert err == (f"rain sweep: error: --checks {f}: cannot register its checks: check module {stem!r} "
                       f"({f.resolve()}): {why}\n")
        with pytest.raises(ValueError, match=re.escape(f"check module {stem!r} ({f.resolve()}): {why}")):
            CheckRegistry().register_module(str(f))
    finally:
        sys.modules.pop(stem, None)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- answer extraction
@pytest.mark.parametrize("text,expected", [
    ("so the total is six hundred thirty-two", "632"),
    ("six hundred and thirty-two", "632"),
    ("minus five", "-5"),
    ("two million three hundred thousand and one", "2300001"),
    ("It comes to 1 234 apples", "1234"),
    ("It comes to 1,234 apples", "1234"),
    ("1_234", "1234"),
    ("costs $1,234.00 in total", "1234"),
    ("x = -7", "-7"),
    ("we tried 5 and 7, \\boxed{12} is it, not 13", "12"),
    ("The answer is 42. Check: 40 + 2 = 42, and 3 more", "42"),
    ("Final answer: nine. (one more thing: 3)", "9"),
    ("the one with 632 is the one", "632"),
    ("no numbers here", None),
])
def test_number_extractor(text, expected):
    assert A.extract_number(text) == expected


def test_answer_extractors_and_answer_correct(mychecks):
    assert C.answer_correct("7 + 5 = 12\n</think>\n\nsix hundred thirty-two", 632)
    assert C.answer_correct("</think>The answer is six hundred and thirty-two.", "632")
    assert not C.answer_correct("</think>six hundred thirty-one", 632)
    assert not C.answer_correct("</think>The answer is 631.", "632")
    assert C.answer_correct("</think>It is 1 234.", "1,234")
    assert A.extract_last_number("the answer is 5, not six hundred") == "5"
    assert A.answer_correct("  Paris  ", "paris", "exact") and not A.answer_correct("Paris, France", "Paris", "exact")
    for text, letter in [("(B)", "B"), ("answer: C", "C"), ("The answer is (D).", "D"), ("\\boxed{E}", "E"),
                         ("I pick A", None), ("the answer is a bit unclear", None)]:
        assert A.extract_choice(text) == letter, text
    assert A.answer_correct("Answer: B", "(B)", "choice") and not A.answer_correct("Answer: B", "C", "choice")
    assert A.answer_correct("RESULT=17 units", "17", r"regex:RESULT=(\d+)")
    assert not A.answer_correct("result 17", "17", r"regex:RESULT=(\d+)")
    assert A.answer_correct("value: Forty-Two", "42", "mychecks:answer_after_colon")
    assert A.compare("0.30000000000000001", "0.3") and not A.compare("0.3001", "0.3")
    reg = A.ExtractorRegistry()
    reg.register("first_word", lambda t: t.split()[0] if t.split() else None)
    assert reg.resolve("first_word")("Hello world") == "Hello"
    with pytest.raises(ValueError, match="unknown answer extractor"):
        reg.resolve("os:getcwd")  # the standard library is never an extractor module


# ----------------------------------------------------------------------------- the server
def test_server_parses_validates_and_never_imports(mychecks):
    from rain_adapter.serve.errors import APIError
    from rain_adapter.serve.requests import parse_rain_checks
    from rain_adapter.serve.scoring import score_output, server_registry

    reg = server_registry(["mychecks"])
    cs = parse_rain_checks(["my:no_digits", "mychecks:ends_with_bang",
                            {"instruction_id": "spec:regex", "kwargs": {"pattern": "wow"}}], reg)
    sc = score_output("r</think>wow!", cs)
    assert sc.compliant is True and [r["ok"] for r in sc.results] == [True, True, True]
    assert score_output("r</think>wow 2!", cs).compliant is False
    for bad, words in [(["otherchecks:shout"], "unknown instruction_id 'otherchecks:shout'"),
                       ([{"instruction_id": "spec:word_count", "kwargs": {"max": -1}}],
                        "rain_checks[0]: spec:word_count: kwargs.max"),
                       (["spec:no_comma", "x"], "rain_checks[0]: unknown")]:
        with pytest.raises(APIError) as ei:
            parse_rain_checks(bad, reg)
        assert ei.value.status == 400 and ei.value.param == "rain_checks" and words in ei.value.message
    with pytest.raises(APIError):  # without --checks the module's ids are unknown, though it is imported now
        parse_rain_checks(["my:no_digits"])
    assert "otherchecks" not in sys.modules


def test_custom_check_module_and_spec_scored_by_the_server(mychecks, tmp_path):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from rain_adapter.serve.app import create_app
    from rain_adapter.serve.scoring import server_registry
    from rain_adapter.testing.serve_tiny import build_tiny_serving, tiny_serve_state
    from rain_adapter.testing.server import ServerThread

    model_dir, adapter_dir = build_tiny_serving(tmp_path / "tiny")
    state = tiny_serve_state(model_dir, adapter_dir, model_name="m", db_path=tmp_path / "log.sqlite",
                             context_length=256, check_registry=server_registry([str(mychecks / "mychecks.py")]))
    checks = [("my:no_digits", {}), ("mychecks:ends_with_bang", {}), ("spec:regex", {"pattern": "[aeiou]"}),
              ("spec:word_count", {"min": 1, "max": 3})]
    body = {"model": "m", "max_tokens": 10, "temperature": 0,
            "rain_checks": [{"instruction_id": i, "kwargs": kw} for i, kw in checks]}
    with ServerThread(create_app(state)) as srv:
        results = []
        for prompt in ("Hello", "Count to ten", "A"):
            r = httpx.post(srv.base_url + "/v1/completions", json={**body, "prompt": prompt}, timeout=60)
            assert r.status_code == 200, r.text
            results.append(r.json())
        boom = httpx.post(srv.base_url + "/v1/completions", timeout=60,
                          json={**body, "prompt": "x", "rain_checks": ["my:explode", "my:no_digits"]}).json()
        bad = [httpx.post(srv.base_url + "/v1/completions", json={**body, "prompt": "x", "rain_checks": rc}, timeout=60)
               for rc in (["otherchecks:shout"], [{"instruction_id": "spec:regex", "kwargs": {"pattern": "("}}])]
    assert [b.status_code for b in bad] == [400, 400] and "otherchecks" not in sys.modules
    assert "rain_checks[0]: spec:regex: kwargs.pattern" in bad[1].json()["error"]["message"]
    con = sqlite3.connect(state.db.path)
    for j in results:
        text = j["choices"][0]["text"]
        want = [EXPECT[i](text, "", kw) for i, kw in checks]
        row = con.execute("SELECT compliant, checks_json, unscored FROM requests WHERE id=?",
                          (j["rain"]["request_id"],)).fetchone()
        assert [c["ok"] for c in json.loads(row[1])] == want, text
        scored = [w for w in want if w is not None]
        assert j["rain"]["compliant"] == (all(scored) if scored else None)
        assert row[2] == want.count(None)
    row = con.execute("SELECT compliant, checks_json, unscored FROM requests WHERE id=?",
                      (boom["rain"]["request_id"],)).fetchone()
    res = json.loads(row[1])
    assert res[0]["ok"] is None and "RuntimeError: kaboom" in res[0]["error"] and row[2] == 1
    assert res[1]["ok"] == (not re.search(r"\d", _answer(boom["choices"][0]["text"])))


def test_serve_and_sweep_cli_take_repeatable_checks():
    from rain_adapter.cli.main import make_parser

    p = make_parser()
    a = p.parse_args(["serve", "--model", "m", "--checks", "a", "--checks", "b.py"])
    assert a.checks == ["a", "b.py"]
    a = p.parse_args(["sweep", "--model", "m", "--adapter", "x", "--prompts", "p", "--checks", "a",
                      "--answer-extract", "choice"])
    assert a.checks == ["a"] and a.answer_extract == "choice"


def test_a_builtin_check_without_its_data_is_unscored_not_a_crash(monkeypatch):
    """lm-eval's IFEval checks without NLTK's punkt_tab raise LookupError: that used to end a sweep
    after all generation; now the check is unscored with the reason and the rest is scored."""
    real = C.check

    def no_punkt(iid, kwargs, response, prompt=None):
        if iid == "length_constraints:number_sentences":
            raise LookupError("Resource punkt_tab not found")
        return real(iid, kwargs, response, prompt=prompt)

    monkeypatch.setattr(C, "check", no_punkt)
    row = {"prompt": "p", "instruction_id_list": ["length_constraints:number_sentences", "punctuation:no_comma"],
           "kwargs": [{"num_sentences": 1, "relation": "at least"}, {}], "answer": "2"}
    scores = S.score_rows([row, row], ["x</think>It is 2.", "x</think>It is 3, sadly."])
    assert [s["follow_all"] for s in scores] == [True, False] and [s["correct"] for s in scores] == [True, False]
    assert all(s["unscored"] == [{"check": "length_constraints:number_sentences",
                                  "reason": "LookupError: Resource punkt_tab not found"}] for s in scores)
    agg = S.evaluate_rows([row], ["x</think>It is 2."])
    assert agg["n_compliance"] == 1 and agg["unscored"] == 1 and agg["instruction_level"] == 1.0


def test_a_server_registry_that_imports_is_refused():
    from rain_adapter.serve.state import ServeState

    with pytest.raises(ValueError, match="must not import"):
        ServeState(model=None, tokenizer=None, model_name="m", lambda_range=(0.0, 1.0), arms=[], db=None,
                   check_registry=CheckRegistry())
