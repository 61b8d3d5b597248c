"""SentencePiece-only tokenizers (issue 24, part 4): a tiny Llama triple whose tokenizer is a
SentencePiece model trained here (``rain_adapter/testing/sentencepiece_tok.py``), shipped as
Llama-2 / Mistral checkpoints ship it (``tokenizer.model``, no ``tokenizer.json``), with a Llama-2-
and a Mistral-style chat template and ``<think>`` / ``</think>``.

transformers 5.x has no slow Llama tokenizer: ``AutoTokenizer`` converts ``tokenizer.model`` into
the ``tokenizers``-backed ``LlamaTokenizer`` when it loads it, and that conversion reads the model
with protobuf (without protobuf the load fails; these tests then skip). The converted tokenizer is
the one ``rain build`` and ``rain serve`` load, so it is what is tested: calibration round-trips, Ω
is exact (compared with positions computed from the token ids alone), with ``<think>`` at the start
of a text and mid-text, after a space (the ``▁`` piece in front of it) and without one; the build
writes a valid adapter, attach works, and ``rain serve`` answers a chat request.
"""

from __future__ import annotations

import json

import pytest
import torch

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf", reason="transformers 5.x needs protobuf to convert a tokenizer.model")

from rain_adapter.merging.calibration import (  # noqa: E402
    build_text, check_round_trip, prepare_reasoning_calibration, thinking_positions,
)
from rain_adapter.testing import sentencepiece_tok as S  # noqa: E402
from rain_adapter.testing.fixtures import make_instruction_records, make_reasoning_samples, write_reasoning_calib  # noqa: E402


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return S.train_sentencepiece(tmp_path_factory.mktemp("spm") / "tokenizer.model")


@pytest.fixture(scope="module", params=S.STYLES)
def triple(request, sp_model, tmp_path_factory):
    return S.make_spm_triple(tmp_path_factory.mktemp(request.param), style=request.param, sp_model=sp_model)


def _tok(triple):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(triple.lrm))


def _marker_ids(sp_model):
    p = spm.SentencePieceProcessor(model_file=str(sp_model))
    return p.piece_to_id(S.THINK_OPEN), p.piece_to_id(S.THINK_CLOSE)


def _omega_from_ids(ids, open_id, close_id, radius):
    """Ω from the token ids alone: the one <think> token and the ``radius`` tokens after it, the one
    </think> token and the ``radius`` tokens before it (never crossing into each other)."""
    assert ids.count(open_id) == 1 and ids.count(close_id) == 1
    o, c = ids.index(open_id), ids.index(close_id)
    pos = {o, c} | set(range(o + 1, min(o + 1 + radius, c))) | set(range(max(c - radius, o + 1), c))
    return sorted(pos)


def _assert_decodes_to(tok, style, ids, text):
    """The text survives the tokenizer. ``legacy: false`` (the Llama-2 style here): byte for byte.
    ``legacy: true`` (the Mistral style here, as older Llama / Mistral tokenizers): SentencePiece's
    dummy prefix is applied to every piece of text that follows an added token, so a ``▁`` token
    the text does not hold may follow ``<s>`` or ``<think>`` and decode shows it as a space: the
    visible characters are the text's, in order (what ``check_round_trip`` asks)."""
    decoded = tok.decode(ids)
    if style == "llama2":
        assert decoded == text
    else:
        assert "".join(decoded.split()) == "".join(text.split())


def test_the_triple_ships_a_sentencepiece_only_tokenizer(triple, sp_model):
    from transformers import AutoConfig

    for d in (triple.paths.base, triple.paths.itm, triple.paths.lrm):
        assert (d / "tokenizer.model").is_file() and not (d / "tokenizer.json").exists()
    tok = _tok(triple)
    assert type(tok).__name__ == "LlamaTokenizer" and tok.is_fast   # converted on load
    p = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert len(tok) == p.get_piece_size() == AutoConfig.from_pretrained(str(triple.lrm)).vocab_size
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (S.BOS_ID, S.EOS_ID, S.UNK_ID)
    open_id, close_id = _marker_ids(sp_model)
    assert tok(S.THINK_OPEN, add_special_tokens=False).input_ids == [open_id]
    assert tok(S.THINK_CLOSE, add_special_tokens=False).input_ids == [close_id]
    # on text without markers the converted tokenizer gives SentencePiece's own ids (the ids the
    # model would have been trained on), byte fallback included
    for text in ("The answer is 12 + 30 = 42.", "Okay, half of 59 is 29.5. Check: fine.", "über ~ 3 ≠ 4"):
        assert tok(text, add_special_tokens=False).input_ids == p.encode(text)


@pytest.mark.parametrize("radius", [0, 2, 5])
def test_calibration_round_trips_and_omega_is_exact(triple, sp_model, radius):
    tok = _tok(triple)
    samples = make_reasoning_samples(6, seed=3)
    calib = prepare_reasoning_calibration(tok, samples, radius=radius, min_samples=6)
    open_id, close_id = _marker_ids(sp_model)
    assert len(calib.items) == 6
    for it in calib.items:
        text = build_text(tok, samples[it.sample_index])
        full = tok(text, add_special_tokens=False).input_ids
        assert full[0] == S.BOS_ID and full.count(S.BOS_ID) == 1   # BOS from the template, once
        want = _omega_from_ids(full, open_id, close_id, radius)
        assert it.positions == want
        assert it.input_ids == full[:want[-1] + 1]                  # cut right after </think>
        _assert_decodes_to(tok, triple.style, full, text)
    head = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert head.endswith("[/INST] <think>\n" if triple.style == "llama2" else "[/INST]<think>\n")


MARKER_TEXTS = {
    "at the start": "<think>\nHalf of 59 is 29.5.\n</think>\n\nThe answer is 29.5.",
    "after a space": "Okay so <think>\nhalf of 59\n</think>\n\ndone",
    "after a word": "Okay<think>half of 59</think>done",
    "after a newline, spaces inside": "Problem 1:\n<think> add 12 and 30 </think> 42",
    "right after [/INST]": "[INST] Add 1 and 2 [/INST]<think>\n1 + 2 = 3\n</think>\n\n3",
}


@pytest.mark.parametrize("where", list(MARKER_TEXTS))
def test_a_marker_at_the_start_or_mid_text_gives_exact_omega(triple, sp_model, where):
    """SentencePiece's word marker ▁ around <think> is the classic trap: a '▁' piece may stand before
    the marker (after a space, or the dummy prefix) or after it; the marker must stay one token and
    Ω must be the positions the token ids say, wherever the marker is."""
    tok = _tok(triple)
    text = MARKER_TEXTS[where]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    open_id, close_id = _marker_ids(sp_model)
    check_round_trip(tok, text, ids, offsets, where=where, vocab_size=len(tok))
    _assert_decodes_to(tok, triple.style, ids, text)
    o = ids.index(open_id)
    assert text[offsets[o][0]:offsets[o][1]] == S.THINK_OPEN   # the marker's own token, with no ▁ in it
    for radius in (0, 1, 3):
        assert thinking_positions(text, offsets, radius) == _omega_from_ids(ids, open_id, close_id, radius)
    if where == "at the start":
        assert ids[0] == open_id      # no ▁ piece is put in front of a marker that opens the text
    if where == "right after [/INST]":
        # the legacy tokenizer (Mistral style here) puts a ▁ piece the text does not hold right after
        # <think>; it is Ω's first neighbour, as the token ids say
        after = tok.convert_ids_to_tokens(ids[o + 1])
        assert (after == "▁") == (triple.style == "mistral"), after


def test_build_attach_and_serve(triple, tmp_path):
    """``rain build`` end to end (Stage 1 + Stage 2) on the SentencePiece triple writes a valid
    adapter whose Ω count is the one computed from the ids; it attaches (λ 0 = the bare LRM, λ 1
    differs); ``rain serve`` answers a chat request rendered with the style's template."""
    from transformers import AutoModelForCausalLM

    from rain_adapter import RainAdapter, RainConfig, build_adapter, load_adapter

    calib = write_reasoning_calib(tmp_path / "calib.json", n=4, seed=2)
    out = build_adapter(triple.paths.lrm, triple.paths.itm, triple.paths.base, tmp_path / "adapter",
                        reasoning_calib=calib, instruction_calib=make_instruction_records(), min_samples=1,
                        stage2_max_seq_len=400, progress=False, verbose=False)
    cfg = RainConfig.load(out)
    tok = _tok(triple)
    open_id, close_id = _marker_ids(triple.sp_model)
    samples = json.loads(calib.read_text())
    n_omega = sum(len(_omega_from_ids(tok(build_text(tok, s), add_special_tokens=False).input_ids, open_id, close_id,
                                      cfg.stage1["radius"])) for s in samples)
    assert cfg.stage1["n_samples"] == 4 and cfg.stage1["n_positions"] == n_omega
    alpha = torch.tensor(list(cfg.stage2["alpha"].values()), dtype=torch.float64)
    assert alpha.shape == (2, 4) and torch.isfinite(alpha).all()
    found = cfg.stage2["samples"]   # Stage 2 mapped every instruction span onto SentencePiece tokens
    assert found["samples_used"] == 3 and not any(found["spans_missing"].values()), found
    _, deltas = load_adapter(out)
    assert len(deltas) == 14 and all(torch.isfinite(d.delta).all() for d in deltas.values() if d.delta is not None)

    lrm = AutoModelForCausalLM.from_pretrained(str(triple.paths.lrm), dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Add 12 and 30."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        bare = lrm(ids).logits
        model = RainAdapter.attach(lrm, out)
        model.set_lambda(0.0)
        at0 = model(ids).logits
        model.set_lambda(1.0)
        at1 = model(ids).logits
    assert torch.equal(at0, bare) and not torch.allclose(at1, bare)
    _serve_one_chat(triple, out, tok, tmp_path)


def _serve_one_chat(triple, adapter, tok, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from rain_adapter.serve.app import create_app, serve_state_from
    from rain_adapter.serve.state import load_served_model
    from rain_adapter.testing.server import ServerThread

    model, stok = load_served_model(str(triple.paths.lrm), str(adapter), device="cpu", dtype="float32")
    state = serve_state_from(model, stok, model_name="spm", db_path=tmp_path / "log.sqlite", max_tokens_cap=16,
                             context_length=512)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 12 and 30."}]
    with ServerThread(create_app(state)) as srv:
        r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=60,
                       json={"model": "spm", "messages": messages, "max_tokens": 8, "temperature": 0,
                             "rain_lambda": 0.5})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert 1 <= body["usage"]["completion_tokens"] <= 8
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg.get("content") or msg.get("reasoning_content") or "", str)


def test_missing_protobuf_is_named_with_the_file(tmp_path, monkeypatch):
    """A tokenizer.model-only checkpoint without protobuf: a ModuleNotFoundError naming protobuf and the
    file (transformers' own error is a tiktoken parse error naming neither), which the CLI maps to the
    `sentencepiece` extra."""
    from rain_adapter.cli.main import missing_extra
    from rain_adapter.format import tokenizer as tokmod

    (tmp_path / "tokenizer.model").write_bytes(b"\x0e not a model")
    monkeypatch.setattr(tokmod, "_importable", lambda m: m != "google.protobuf")
    with pytest.raises(ModuleNotFoundError) as e:
        tokmod.load_tokenizer(tmp_path)
    assert e.value.name == "protobuf" and "tokenizer.model" in str(e.value) and "protobuf" in str(e.value)
    assert missing_extra(e.value) == "sentencepiece"
    (tmp_path / "tokenizer.json").write_text("{}")  # a fast tokenizer beside it: no conversion, no check
    monkeypatch.setattr(tokmod, "_importable", lambda m: False)
    with pytest.raises(Exception) as e2:
        tokmod.load_tokenizer(tmp_path)
    assert not isinstance(e2.value, ModuleNotFoundError) or e2.value.name not in ("protobuf", "sentencepiece")
