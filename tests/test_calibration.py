"""Reasoning calibration: loaders, text construction, token positions Ω."""

from __future__ import annotations

import json

import pytest

from rain_adapter.merging.calibration import (CalibrationError, build_text, load_samples,
                                      prepare_reasoning_calibration)
from rain_adapter.testing.fixtures import PLAIN_CHAT_TEMPLATE, make_reasoning_samples, make_tokenizer, write_reasoning_calib


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_positions_exact(tok):
    s = {"prompt": "P", "reasoning": "abcdefghijklmnop", "response": "xyz"}
    cs = prepare_reasoning_calibration(tok, [s], radius=3, min_samples=1)
    it = cs.items[0]
    text = build_text(tok, s)
    assert text.count("<think>") == 1  # the template's generation prompt already opened it
    assert text.endswith("abcdefghijklmnop\n</think>\n\nxyz")
    got = [tok.decode([it.input_ids[p]]) for p in it.positions]
    assert got == ["<think>", "\n", "a", "b", "o", "p", "\n", "</think>"]
    # one tokenisation, same as the chat template path (BOS rendered by the template, not doubled)
    full = tok.apply_chat_template([{"role": "user", "content": "P"}], tokenize=True, add_generation_prompt=True)
    if isinstance(full, dict) or hasattr(full, "input_ids"):
        full = full["input_ids"]
    assert it.input_ids[:len(full)] == list(full)
    assert it.input_ids.count(tok.bos_token_id) == 1
    assert it.input_ids[-1] == tok.convert_tokens_to_ids("</think>")  # cut after the last Ω position
    # short reasoning: windows overlap, no duplicates, nothing outside the think block
    cs = prepare_reasoning_calibration(tok, [dict(s, reasoning="ab")], radius=5, min_samples=1)
    got = [tok.decode([cs.items[0].input_ids[p]]) for p in cs.items[0].positions]
    assert got == ["<think>", "\n", "a", "b", "\n", "</think>"]


def test_template_without_generation_think_gets_one():
    t = make_tokenizer()
    t.chat_template = PLAIN_CHAT_TEMPLATE + "{# mentions <think> for the check #}"
    text = build_text(t, {"prompt": "p", "reasoning": "r", "response": "x"})
    assert text.count("<think>") == 1 and "<|Assistant|><think>\nr\n</think>\n\nx" in text


def test_json_and_jsonl_and_shared(tmp_path, tok):
    a = write_reasoning_calib(tmp_path / "a.json", n=5)
    b = write_reasoning_calib(tmp_path / "b.jsonl", n=5, jsonl=True)
    ca = prepare_reasoning_calibration(tok, a, min_samples=5)
    cb = prepare_reasoning_calibration(tok, b, min_samples=5)
    assert [i.input_ids for i in ca.items] == [i.input_ids for i in cb.items]
    assert ca.info["calib_hash"] == cb.info["calib_hash"] and ca.info["n_positions"] == 5 * 12
    shared = prepare_reasoning_calibration(tok, None, max_samples=3, max_seq_len=100_000)
    assert shared.info["n_samples"] == 3 and all(len(i.positions) == 12 for i in shared.items)


def test_bad_inputs(tmp_path, tok):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt": "a", "reasoning": "b"}) + "\n")
    with pytest.raises(CalibrationError, match=r"bad\.jsonl.*'response'"):
        load_samples(p)
    p2 = tmp_path / "bad2.json"
    p2.write_text(json.dumps([{"prompt": "a", "thinking": "b", "response": "c"}]))
    with pytest.raises(CalibrationError, match=r"bad2\.json: sample 0 has no field 'reasoning'"):
        prepare_reasoning_calibration(tok, p2)
    plain = make_tokenizer(chat_template=PLAIN_CHAT_TEMPLATE)
    with pytest.raises(CalibrationError, match="no thinking markers"):
        prepare_reasoning_calibration(plain, make_reasoning_samples(4), min_samples=1)
    # markers inside reasoning -> skipped; too few usable -> loud failure
    samples = make_reasoning_samples(4)
    samples[0]["reasoning"] += "</think>"
    samples[1]["reasoning"] = "<think>" + samples[1]["reasoning"]
    cs = prepare_reasoning_calibration(tok, samples, min_samples=2)
    assert cs.info["skipped"]["markers"] == 2 and cs.info["n_samples"] == 2
    with pytest.raises(CalibrationError, match="only 2 usable"):
        prepare_reasoning_calibration(tok, samples, min_samples=3)
    with pytest.raises(CalibrationError, match="max_seq_len"):
        prepare_reasoning_calibration(tok, make_reasoning_samples(4), max_seq_len=10, min_samples=1)


def test_packaged_calibration_sets_are_the_default_wherever_it_runs(tmp_path, monkeypatch):
    """No RAIN_CALIB_DIR: the package's own copy, even with a ``shared/`` calibration folder holding
    other data beside the checkout or in the working directory (defaults never depend on the cwd)."""
    import json

    from pathlib import Path

    import rain_adapter.format.paths as paths

    monkeypatch.delenv("RAIN_CALIB_DIR", raising=False)
    decoy = tmp_path / "shared" / "data" / "rain_calibration"
    decoy.mkdir(parents=True)
    (decoy / "reasoning_calibration_set.json").write_text("[]")
    monkeypatch.chdir(tmp_path)
    d = paths.calibration_dir()
    assert d == Path(paths.__file__).resolve().parent.parent / "data" / "rain_calibration"
    assert (d / "LICENSE").read_text().startswith("MIT License")
    assert len(json.loads((d / "reasoning_calibration_set.json").read_text())) > 100
    with open(d / "instruction_calibration_set.jsonl") as f:
        assert sum(1 for line in f if line.strip()) > 100


def test_calibration_dir_override_by_env_only(tmp_path, monkeypatch):
    import rain_adapter.format.paths as paths

    (tmp_path / "reasoning_calibration_set.json").write_text("[]")
    monkeypatch.setenv("RAIN_CALIB_DIR", str(tmp_path))
    assert paths.calibration_dir() == tmp_path
    monkeypatch.setenv("RAIN_CALIB_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="RAIN_CALIB_DIR"):
        paths.calibration_dir()
