"""A build never succeeds on inputs that make it wrong (issue 16, points 2, 6, 7).

A: every calibration text round-trips through the tokenizer (the user's WordLevel tokenizer that
transformers rebuilt without its words); B: the instruction set is checked before Stage 1; C: a
near-empty Stage 1 is a loud warning and recorded; D: ``--projection exact``; E: a Hub id that
cannot be fetched offline is one line; F: the presets are the paper's triples, ``--list-presets``;
G: the triple's configs and shapes are compared before any weight is loaded.
"""

from __future__ import annotations

import json
import shutil
import socket
import warnings

import pytest
import torch

import rain_adapter.merging.features as features
import rain_adapter.merging.pipeline as pipeline
from rain_adapter.merging.calibration import CalibrationError, check_round_trip, prepare_reasoning_calibration
from rain_adapter.merging.errors import BuildError, ConfigMismatchWarning, HubFetchError, KeptNormWarning
from rain_adapter.merging.nullspace import PROJECTIONS, project
from rain_adapter.merging.options import BuildOptions
from rain_adapter.merging.pipeline import build_adapter
from rain_adapter.merging.presets import PRESETS, format_presets
from rain_adapter.merging.spans import SpanError, prepare_instruction_samples
from rain_adapter.merging.taskvector import CheckpointReader
from rain_adapter.cli.main import main
from rain_adapter.testing.fixtures import make_reasoning_samples, make_tiny_triple, make_tokenizer, \
    write_reasoning_calib


# `triple` and `calib`: the shared session fixtures of conftest.py


def _build(triple, calib, out, **kw):
    kw.setdefault("min_samples", 1)
    kw.setdefault("progress", False)
    return build_adapter(kw.pop("lrm", triple.lrm), kw.pop("itm", triple.itm), kw.pop("base", triple.base), out,
                         reasoning_calib=calib, **kw)


@pytest.fixture
def no_stage1(monkeypatch):
    """Fail the test if the build loads the LRM or starts Stage 1."""
    def boom(*a, **k):
        raise AssertionError("the build got past its input checks")
    for name in ("load_lrm", "run_stage1"):
        monkeypatch.setattr(pipeline, name, boom)
    monkeypatch.setattr(features, "iter_layer_features", boom)


def _nothing_written(out):
    return not out.exists() and not out.with_name(out.name + ".partial").exists()


# ---- A. the tokenizer round-trip --------------------------------------------------------------
WORDS = ["what", "is", "plus", "okay", "so", "the", "answer", "check", "fine", "then", "."] + [str(d) for d in range(10)]
SPECIALS = ["<|pad|>", "<|unk|>", "<|bos|>", "<|end|>", "<|User|>", "<|Assistant|>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|User|>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}")


def _word_level():
    """The user's tokenizer: a world-like WordLevel vocabulary (whole words, digits), fast."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>",
                                   pad_token="<|pad|>", unk_token="<|unk|>")
    fast.chat_template = TEMPLATE
    return fast


def _world_samples(n=3):
    return [{"prompt": f"what is {i} plus 4", "reasoning": f"okay so {i} plus 4 is {i + 4} . check fine",
             "response": f"the answer is {i + 4}"} for i in range(n)]


def test_word_level_tokenizer_rebuilt_for_qwen2_fails_before_stage1(triple, tmp_path, no_stage1):
    """The user's case: saved with save_pretrained next to a qwen2 config and loaded back, the
    WordLevel vocabulary becomes a merge-less BPE that keeps only single characters (the digits)."""
    from transformers import AutoTokenizer

    wl = _word_level()
    samples = _world_samples()
    assert prepare_reasoning_calibration(wl, samples, min_samples=1).info["n_samples"] == 3  # fine in memory
    lrm = tmp_path / "lrm"
    shutil.copytree(triple.lrm, lrm)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (lrm / f).unlink(missing_ok=True)
    wl.save_pretrained(lrm)
    assert json.loads((lrm / "config.json").read_text())["model_type"] == "qwen2"
    reloaded = AutoTokenizer.from_pretrained(str(lrm))
    text = "what is 3 plus 4"
    assert reloaded.decode(reloaded(text, add_special_tokens=False).input_ids) == "34"  # the words are gone
    calib = tmp_path / "world_calib.json"
    calib.write_text(json.dumps(samples))
    out = tmp_path / "out"
    with pytest.raises(BuildError) as e:
        _build(triple, calib, out, lrm=lrm, no_stage2=True)
    msg = str(e.value)
    assert isinstance(e.value, CalibrationError) and e.value.field == "reasoning_calib"
    assert f"reasoning calibration {calib} sample 0: the tokenizer drops 'what is'" in msg, msg
    assert "decode(encode(text)) = " in msg and "is this the LRM's tokenizer?" in msg
    assert _nothing_written(out)
    # the CLI: one line, exit 2
    assert main(["build", "--lrm", str(lrm), "--itm", str(triple.itm), "--base", str(triple.base), "--out",
                 str(out), "--reasoning-calib", str(calib), "--min-samples", "1", "--no-progress"]) == 2


def test_byte_level_and_world_tokenizers_round_trip(tmp_path):
    """No false alarm: the fixtures' byte-level BPE, and the demo world's (NFC, Qwen2 regex) saved
    and reloaded as Qwen2Tokenizer, keep LaTeX, accents and unseen words."""
    from transformers import AutoTokenizer

    from rain_adapter.demo.tokenizer import make_world_tokenizer, train_backend
    from rain_adapter.testing.fixtures import tiny_triple_config

    samples = make_reasoning_samples(4) + [{"prompt": "Café naïve — 東京?", "reasoning": "Zebra  quux\t$x^2$",
                                            "response": "Ångström"}]
    assert prepare_reasoning_calibration(make_tokenizer(), samples, min_samples=1).info["n_samples"] == 5
    world = make_world_tokenizer(train_backend(["what is two plus two", "the answer is four"]))
    world.save_pretrained(tmp_path)
    tiny_triple_config(vocab_size=len(world)).save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    cs = prepare_reasoning_calibration(reloaded, samples, min_samples=1, vocab_size=len(reloaded))
    assert cs.info["n_samples"] == 5


class _FakeTokenizer:
    """decode gives the text back, but the offsets leave a character out."""

    unk_token_id, unk_token, backend_tokenizer = None, None, None

    def decode(self, ids, **kw):
        return "abc"


def test_round_trip_checks_ids_unknown_tokens_and_offsets():
    samples = make_reasoning_samples(2)
    with pytest.raises(CalibrationError, match=r"sample 0: token id \d+ .* outside the model's vocabulary of 200"):
        prepare_reasoning_calibration(make_tokenizer(), samples, min_samples=1, vocab_size=200)
    with pytest.raises(CalibrationError, match=r"x\.json sample 2: the tokenizer turns 'zebra' into '<\|unk\|>'"):
        check_round_trip(_word_level(), "what is zebra", [6, 7, 1], [(0, 4), (5, 7), (8, 13)], where="x.json sample 2")
    with pytest.raises(CalibrationError, match=r"no token covers 'c' \(character 2"):
        check_round_trip(_FakeTokenizer(), "abc", [0, 1], [(0, 1), (1, 2)], where="s")
    check_round_trip(_FakeTokenizer(), "a b\nc", [0, 1, 2], [(0, 1), (2, 3), (4, 5)], where="s")  # spaces: fine


def test_instruction_set_is_round_tripped_too(tmp_path):
    rec = {"prompt": "what is 3 plus 4", "response": "the answer is 7", "reason": "okay",
           "related_prompt_list": [{"prompt_spans": ["what is 3"], "response_spans": ["the answer"]}]}
    assert prepare_instruction_samples([rec], _word_level())[1].samples_used == 1
    rec["prompt"] = "what is zebra plus 4"
    with pytest.raises(SpanError, match=r"instruction calibration .* record 0 .*'zebra'") as e:
        prepare_instruction_samples([rec], _word_level(), source="inst.jsonl")
    assert e.value.field == "instruction_calib" and isinstance(e.value, BuildError)


# ---- B. the instruction set is checked before Stage 1 ----------------------------------------
def _inst_record(**kw):
    rec = {"id": 1, "prompt": "Write a poem about cats. Use no commas.", "reason": "A poem.",
           "response": "Cats sleep all day\nThe end",
           "related_prompt_list": [{"prompt_spans": ["Write a poem about cats"],
                                    "response_spans": ["Cats sleep all day"]}]}
    rec.update(kw)
    return rec


@pytest.mark.parametrize("bad, match", [
    ("malformed", r"inst\.jsonl:2: invalid JSON"),
    ("no_span", r"inst\.jsonl: none of the 2 spans was found"),
    ("no_related", r"no instruction has both prompt spans and related response spans"),
])
def test_bad_instruction_calibration_fails_before_stage1(triple, calib, tmp_path, no_stage1, bad, match):
    inst = tmp_path / "inst.jsonl"
    good = json.dumps(_inst_record())
    if bad == "malformed":
        inst.write_text(good + "\n{\"prompt\": \n")
    elif bad == "no_span":
        inst.write_text(json.dumps(_inst_record(related_prompt_list=[
            {"prompt_spans": ["not in the prompt"], "response_spans": ["nor in the response"]}])) + "\n")
    else:
        inst.write_text(json.dumps(_inst_record(related_prompt_list=[
            {"prompt_spans": ["Write a poem about cats"], "response_spans": [],
             "unrelated_response_spans": ["The end"]}])) + "\n")
    out = tmp_path / "out"
    with pytest.raises(BuildError, match=match) as e:
        _build(triple, calib, out, instruction_calib=inst)
    assert e.value.field == "instruction_calib"
    assert _nothing_written(out)


def test_instruction_set_is_not_read_when_stage2_does_not_run(triple, calib, tmp_path):
    inst = tmp_path / "inst.jsonl"
    inst.write_text("not json\n")
    out = _build(triple, calib, tmp_path / "out", instruction_calib=inst, no_stage2=True, layers=[1], verbose=False)
    assert json.loads((out / "adapter_config.json").read_text())["method"] == "rain-stage1"


# ---- C. a near-empty Stage 1 is a loud warning ------------------------------------------------
def test_kept_norm_warning_when_the_rows_outnumber_the_width(triple, tmp_path, capsys):
    """16 samples × 12 positions = 192 rows ≥ every module's width (64, 128): the exact projector
    removes (almost) all of Δ. Said even with verbose=False, recorded in config.stage1."""
    many = write_reasoning_calib(tmp_path / "many.json", n=16)
    kw = dict(layers=[1], svd_dtype="float64", verbose=False, no_stage2=True)
    with pytest.warns(KeptNormWarning, match=r"7 of 7 projected modules \(near\) zero") as rec:
        out = _build(triple, many, tmp_path / "e1", protect_energy=1.0, **kw)
    msg = str(rec[0].message)
    assert "--protect-energy 1.0, 192 calibration rows" in msg and "--projection ridge" in msg, msg
    assert "the adapter is almost empty" in msg
    err = capsys.readouterr().err
    assert err.count("[rain build] WARNING: Stage 1 kept") == 1
    st1 = json.loads((out / "adapter_config.json").read_text())["stage1"]
    assert st1["kept_norm_total"] < 0.05 and st1["warnings"] == [msg]
    assert all(s["task_norm"] > 0 and s["kept_norm"] < 0.01 for s in st1["modules"].values())
    # the same rows at the default energy keep most of Δ: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeptNormWarning)
        ok = _build(triple, many, tmp_path / "e95", **kw)
    st1 = json.loads((ok / "adapter_config.json").read_text())["stage1"]
    assert st1["warnings"] == [] and st1["kept_norm_total"] > 0.5
    assert "WARNING" not in capsys.readouterr().err


def test_task_norm_is_recorded_for_every_method(triple, calib, tmp_path):
    out = _build(triple, calib, tmp_path / "ties", method="ties", layers=[0], verbose=False)
    st1 = json.loads((out / "adapter_config.json").read_text())["stage1"]
    assert all(s["task_norm"] > 0 for s in st1["modules"].values()) and st1["kept_norm_total"] > 0


# ---- D. --projection exact ---------------------------------------------------------------------
def test_exact_is_hard_at_full_energy_bit_for_bit(triple, calib, tmp_path):
    assert "exact" in PROJECTIONS
    g = torch.Generator().manual_seed(0)
    delta, X = torch.randn(24, 32, generator=g), torch.randn(20, 32, generator=g)
    a, sa = project(delta, X, projection="exact", protect_energy=0.3)  # protect_energy is not used
    b, sb = project(delta, X, projection="hard", protect_energy=1.0)
    assert torch.equal(a, b) and sa == sb and sa.protected_rank == 20
    ex = _build(triple, calib, tmp_path / "exact", projection="exact", layers=[0], verbose=False)
    hd = _build(triple, calib, tmp_path / "hard", projection="hard", protect_energy=1.0, layers=[0], verbose=False)
    from rain_adapter.format.store import load_adapter

    (cfg_e, d_e), (cfg_h, d_h) = load_adapter(ex)[:2], load_adapter(hd)[:2]
    assert cfg_e.stage1["projection"] == "exact" and cfg_e.stage1["protect_energy"] is None
    assert cfg_h.stage1["projection"] == "hard" and cfg_h.stage1["protect_energy"] == 1.0
    assert d_e.keys() == d_h.keys() and all(torch.equal(d_e[n].delta, d_h[n].delta) for n in d_e)
    with pytest.raises(BuildError, match="does not apply to --projection exact") as e:
        BuildOptions(lrm="l", itm="i", base="b", out="o", projection="exact", protect_energy=0.9).validate()
    assert e.value.field == "protect_energy"


# ---- E. offline Hub ids ----------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, and any socket connection fails the test."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*a, **k):
        raise AssertionError("the build tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", no_network)


def test_offline_hub_ids_are_one_line(triple, calib, tmp_path, offline, no_stage1, capsys):
    out = tmp_path / "out"
    with pytest.raises(HubFetchError) as e:
        _build(triple, calib, out, itm="rain-test-no-org/no-such-itm")
    msg = str(e.value)
    assert e.value.field == "itm" and "\n" not in msg
    assert msg.startswith("cannot fetch 'rain-test-no-org/no-such-itm' from the Hugging Face Hub (offline")
    assert "hf download rain-test-no-org/no-such-itm" in msg and msg.endswith("local directory with --itm")
    # all three at once: one error naming each
    with pytest.raises(HubFetchError) as e:
        build_adapter("rain-test-no-org/lrm", "rain-test-no-org/itm", "rain-test-no-org/base", out)
    assert all(f"'rain-test-no-org/{r}'" in str(e.value) and f"with --{r}" in str(e.value)
               for r in ("lrm", "itm", "base"))
    # the checkpoint reader on its own, and a name that is neither a directory nor an id
    with pytest.raises(HubFetchError, match="--base"):
        CheckpointReader("rain-test-no-org/base", "base")
    with pytest.raises(BuildError, match="no such directory"):
        _build(triple, calib, out, base=str(tmp_path / "missing"))
    assert _nothing_written(out)
    capsys.readouterr()
    assert main(["build", "--preset", "qwen7b", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("rain build: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "cannot fetch 'deepseek-ai/DeepSeek-R1-Distill-Qwen-7B'" in lines[0]
    assert "'Qwen/Qwen2.5-7B'" in lines[0] and "with --base" in lines[0]


# ---- F. presets ------------------------------------------------------------------------------
def test_presets_are_the_papers_triples():
    for size in ("1.5B", "7B", "14B", "32B"):
        p = PRESETS[f"qwen{size.lower()}"]
        assert (p.lrm, p.itm, p.base) == (f"deepseek-ai/DeepSeek-R1-Distill-Qwen-{size}",
                                          f"Qwen/Qwen2.5-{size}-Instruct", f"Qwen/Qwen2.5-{size}")
        assert "paper" in p.source and "authors' code" in p.source
    p = PRESETS["llama8b"]
    assert (p.itm, p.base) == ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B")
    for size in ("1.5B", "7B"):
        m = PRESETS[f"qwen{size.lower()}-math"]
        assert (m.lrm, m.itm, m.base) == (f"deepseek-ai/DeepSeek-R1-Distill-Qwen-{size}",
                                          f"Qwen/Qwen2.5-Math-{size}-Instruct", f"Qwen/Qwen2.5-Math-{size}")
        assert "LRM's own base" in m.source
    assert BuildOptions(preset="qwen7b").resolved().itm == "Qwen/Qwen2.5-7B-Instruct"
    assert BuildOptions(preset="qwen7b-math").resolved().out.name == "rain-qwen7b-math"


def test_list_presets_needs_no_other_flag(capsys):
    assert main(["build", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == format_presets()
    for name, p in PRESETS.items():
        assert f"\n{name}\n" in f"\n{out}" and p.lrm in out and p.itm in out and p.base in out and p.source in out


# ---- G. the triple's configs, before any weight --------------------------------------------
def test_structural_config_difference_fails_in_seconds(triple, calib, tmp_path, no_stage1):
    other = make_tiny_triple(tmp_path / "wide", arch="qwen2", seed=3, hidden_size=96)
    out = tmp_path / "out"
    with pytest.raises(BuildError, match=r"their configs differ: hidden_size: LRM 64 vs ITM 64 vs base 96") as e:
        _build(triple, calib, out, base=other.base)
    assert e.value.field == "base" and "head_dim: LRM 16 vs ITM 16 vs base 24" in str(e.value)
    assert _nothing_written(out)


def test_shapes_are_checked_before_the_lrm_loads(triple, calib, tmp_path, no_stage1):
    """Same config, a mis-shaped tensor: found from the headers against the config skeleton."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(triple.base, base)
    idx = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.up_proj.weight"
    ts = load_file(str(base / idx[name]))
    ts[name] = ts[name][:, :10].contiguous()
    save_file(ts, str(base / idx[name]), metadata={"format": "pt"})
    with pytest.raises(BuildError, match=r"up_proj.*\[128, 10\]"):
        _build(triple, calib, tmp_path / "out", base=base)


def test_rope_theta_difference_is_a_warning(triple, calib, tmp_path, capsys):
    itm = tmp_path / "itm"
    shutil.copytree(triple.itm, itm)
    cfg = json.loads((itm / "config.json").read_text())
    cfg.setdefault("rope_parameters", {})["rope_theta"] = 1000000.0
    (itm / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(ConfigMismatchWarning, match=r"rope_theta: LRM 10000\.0 vs ITM 1000000\.0 vs base 10000\.0"):
        out = _build(triple, calib, tmp_path / "out", itm=itm, layers=[0], verbose=False)
    assert "[rain build] WARNING: the LRM, ITM and base configs differ in rope_theta" in capsys.readouterr().err
    assert "rope_theta" in json.loads((out / "adapter_config.json").read_text())["extra"]["warnings"][0]
