"""The toy world: tokenizer, data, calibration-set compatibility, and (slow) a CI-sized trained world
that must be sound and in which RAIN at λ = 1 keeps ≥ 90 % of the LRM's thinking-format validity."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from rain_adapter.demo import data as D
from rain_adapter.demo.tokenizer import EOS, THINK_CLOSING, chat_prefix, make_world_tokenizer, train_backend


@pytest.fixture(scope="module")
def toks():
    backend = train_backend(D.vocab_texts(2))
    return make_world_tokenizer(backend, reasoning=True), make_world_tokenizer(backend, reasoning=False)


def test_tokenizer_roundtrip_offsets_and_templates(toks, tmp_path):
    tok_r, tok_d = toks
    doc = D.reasoning_doc(random.Random(0), 2, p_instr=1.0, p_follow=1.0)
    text, start = D.render(doc)
    enc = tok_r(text, return_offsets_mapping=True, add_special_tokens=False)
    assert tok_r.unk_token_id not in enc.input_ids
    assert tok_r.decode(enc.input_ids) == text                                   # exact round trip
    assert all(text[a:b] == tok_r.decode([i]) for i, (a, b) in zip(enc.input_ids, enc.offset_mapping))
    msgs = [{"role": "user", "content": doc["prompt"]}]
    gen_r = tok_r.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    gen_d = tok_d.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert gen_r == chat_prefix(doc["prompt"], reasoning=True) and gen_r.endswith("<think>\n")
    assert gen_d == chat_prefix(doc["prompt"], reasoning=False) and "<think>" not in gen_d
    assert text == gen_r + doc["reasoning"] + THINK_CLOSING + doc["response"] + EOS and start == len(gen_r)
    # decode(skip_special_tokens) keeps the (non-special) thinking markers
    assert "</think>" in tok_r.decode(enc.input_ids, skip_special_tokens=True)
    # every word / digit / punctuation run of the world's text is one token
    assert len(enc.input_ids) < 0.45 * len(text)
    # next to a Qwen2 config, AutoTokenizer rebuilds it as Qwen2Tokenizer: it must tokenise the same
    from transformers import AutoTokenizer, Qwen2Config

    Qwen2Config(vocab_size=len(tok_r)).save_pretrained(tmp_path)
    tok_r.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False).input_ids == enc.input_ids
    assert again.chat_template == tok_r.chat_template
    assert again.decode(enc.input_ids) == text


def test_trace_and_held_out_split():
    assert D.addition_trace(57, 68).splitlines() == [
        "7 + 8 = 15, write 5, carry 1.", "5 + 6 + 1 = 12, write 2, carry 1.", "Bring down the carry 1.",
        "So 57 + 68 = 125."]
    rng = random.Random(0)
    train = {D.addition_pair(rng, 2) for _ in range(300)}
    assert all(D._split(a, b) == "train" for a, b in train)
    rows = D.eval_prompts(12, 2, task="reasoning")
    for r in rows:  # evaluation pairs are held out of training
        a, b = (int(x) for x in re.findall(r"\d+", r["prompt"])[:2])
        assert D._split(a, b) == "eval" and int(r["answer"]) == a + b
    assert {r["instruction_id_list"][0] for r in rows} == set(D.INSTRUCTION_IDS)
    assert all(r["answer"].isdigit() and len(r["kwargs"]) == 1 for r in rows)


def test_calibration_sets_have_the_shared_shapes(toks):
    from rain_adapter.format.paths import calibration_dir

    shared = calibration_dir()
    real_r = json.loads((shared / "reasoning_calibration_set.json").read_text())[0]
    real_i = json.loads((shared / "instruction_calibration_set.jsonl").read_text().splitlines()[0])
    ours_r = D.reasoning_calibration(4, 2)[0]
    ours_i = D.instruction_calibration(6, 2)[0]
    assert {"prompt", "reasoning", "response"} <= set(ours_r) and {"prompt", "reasoning", "response"} <= set(real_r)
    for k in ("prompt", "reason", "response", "related_prompt_list", "unrelated_response_spans",
              "instruction_id_list"):
        assert k in ours_i and type(ours_i[k]) is type(real_i[k]), k
    for k in ("instruction_id", "prompt_spans", "response_spans"):
        assert k in ours_i["related_prompt_list"][0] and k in real_i["related_prompt_list"][0]


def test_world_calibration_feeds_stage1_and_stage2_loaders(toks):
    from rain_adapter.merging.calibration import prepare_reasoning_calibration
    from rain_adapter.merging.spans import prepare_instruction_samples

    tok_r, _ = toks
    cs = prepare_reasoning_calibration(tok_r, D.reasoning_calibration(16, 2), radius=5, min_samples=8)
    assert len(cs.items) == 16 and cs.n_positions == 16 * 12
    samples, report = prepare_instruction_samples(D.instruction_calibration(18, 2), tok_r)
    assert report.samples_used == 18 and report.spans_missing["related"] == 0
    assert report.pairs_related == 18 and report.pairs_unrelated == 9   # title / end phrase / postscript


# ----------------------------------------------------------------------------- the trained CI world

# ``ci_world``: the session fixture in conftest.py (trained once, shared with test_tune.py)


@pytest.mark.slow
def test_ci_world_is_sound_and_rain_keeps_format(ci_world, tmp_path):
    from rain_adapter.merging.pipeline import build_adapter
    from rain_adapter.evaluation.sweep import load_model, load_prompts, sweep_adapters
    from rain_adapter.demo.run import CI_GATE
    from rain_adapter.demo.soundness import evaluate_world, is_sound, max_new_tokens

    info = json.loads(ci_world.info.read_text())
    for name in ("lrm", "itm"):  # fine-tunes stay close to the shared base
        assert info[name]["delta_ratio"]["median"] < 0.15, info[name]["delta_ratio"]
    metrics = evaluate_world(ci_world, limit=36)
    assert not is_sound(metrics, **CI_GATE), metrics  # the gate `rain demo --ci` applies
    assert metrics["base_direct"]["compliance"] < metrics["itm"]["compliance"]

    ad = build_adapter(ci_world.lrm, ci_world.itm, ci_world.base, tmp_path / "rain",
                       reasoning_calib=str(ci_world.reasoning_calib),
                       instruction_calib=str(ci_world.instruction_calib), method="rain", progress=False,
                       verbose=False)
    model, tok = load_model(ci_world.lrm)
    rows = load_prompts(ci_world.eval_reasoning, 36)
    recs = sweep_adapters(model, tok, [ad], rows, [0.0, 1.0], names=["rain"],
                          max_new_tokens=max_new_tokens(2, True), progress=False)
    lrm, rain1 = recs
    assert lrm["format_validity"] >= 0.95
    assert rain1["format_validity"] >= 0.9 * lrm["format_validity"], recs
    torch.testing.assert_close(torch.tensor(lrm["compliance"]), torch.tensor(metrics["lrm"]["compliance"]))


@pytest.mark.slow
def test_world_training_is_deterministic(ci_world, tmp_path):
    """A world trained twice (same machine) gives bit-identical weights and data files.

    The second training is the one ``ensure_world`` does for a cached world that changed after it
    was made (issue 24): one byte of a copy's LRM is flipped, which is a warning naming the file
    and a retrain (no world ships for this config), never a run on the changed weights. Both
    trainings use the CI world's recipe with a tenth of its steps and samples (the same code, ~25 s
    instead of ~4 min each); the CI world itself is checked against its record."""
    import shutil
    from dataclasses import replace

    from rain_adapter.demo.shipped import WorldIntegrityWarning, file_sha256, record_problem, weights_sha256, world_files
    from rain_adapter.demo.train import ci_config, ensure_world

    assert record_problem(ci_world.root) is None   # the record written when it was trained
    cfg = replace(ci_config(), base_steps=80, ft_steps=8, n_calib_reasoning=4, n_calib_instruction=6, n_eval=4)
    first, again = tmp_path / "first", tmp_path / "again"
    ensure_world(cfg, first, progress=False)
    shutil.copytree(first, again, ignore=shutil.ignore_patterns("adapters", "demo"))
    lrm = again / "lrm" / "model.safetensors"
    raw = bytearray(lrm.read_bytes())
    raw[-1] ^= 0x01
    lrm.write_bytes(bytes(raw))
    with pytest.warns(WorldIntegrityWarning, match=r"lrm/model\.safetensors has SHA-256 .*retrained"):
        ensure_world(cfg, again, progress=False)
    assert record_problem(again) is None
    assert weights_sha256(again) == weights_sha256(first)

    def files(root):
        return {p.relative_to(root): file_sha256(p) for p in world_files(root) if p.name != "world.json"}
    assert files(again) == files(first)
    info = [json.loads(p.read_text()) for p in (first / "world.json", again / "world.json")]
    assert info[0]["lrm"]["loss_last"] == info[1]["lrm"]["loss_last"]


def test_format_world_config_and_the_shipped_key():
    """The format world differs only in its ITM; fields added late leave the shipped world's key alone."""
    from rain_adapter.demo.shipped import shipped_world
    from rain_adapter.demo.train import WorldConfig, format_world_config

    assert shipped_world(WorldConfig().key()) is not None
    fw = format_world_config(3)
    assert fw.seed == 3 and fw.itm_direct_add == 0.9 and fw.itm_ft_steps == 240 and fw.key() != WorldConfig(seed=3).key()
    rng = random.Random(7)
    docs = [D.itm_sample(rng, 3, p_direct_add=1.0)[0] for _ in range(40)]
    # every ITM chat is then a 3-digit addition answered directly, never with a thinking block
    assert all(re.search(r"\d{3}", d) and "<think>" not in d for d in docs)
