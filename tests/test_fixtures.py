"""The shared offline fixtures: tokenizer + tiny sharded triple."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from rain_adapter.testing.fixtures import (SPECIAL_TOKENS, THINK_CLOSE, THINK_OPEN, make_tiny_triple,
                                   make_tokenizer)


def test_tokenizer_offsets_and_specials():
    tok = make_tokenizer()
    for t in SPECIAL_TOKENS:
        ids = tok(t, add_special_tokens=False).input_ids
        assert len(ids) == 1, t
    text = tok.apply_chat_template([{"role": "user", "content": "Solve $\\frac{1}{2}x=3$ — é"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text.endswith(THINK_OPEN + "\n")
    text = text + "reason" + "\n" + THINK_CLOSE + "\n\nanswer"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert tok.decode(enc.input_ids) == text
    pieces = "".join(text[a:b] for (a, b), prev in zip(enc.offset_mapping, [None] + enc.offset_mapping[:-1])
                     if prev is None or (a, b) != tuple(prev))
    assert pieces == text  # offsets tile the string (multi-byte chars share one span)
    assert enc.input_ids.count(tok.convert_tokens_to_ids(THINK_OPEN)) == 1
    assert enc.input_ids.count(tok.convert_tokens_to_ids(THINK_CLOSE)) == 1
    # BOS added by the post-processor
    assert tok("x").input_ids[0] == tok.bos_token_id
    assert tok.pad_token_id is not None
    left = make_tokenizer(padding_side="left")
    batch = left(["a", "abc"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0].item() == left.pad_token_id


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_triple_sharded_and_deterministic(tmp_path, arch):
    p = make_tiny_triple(tmp_path / "a", arch=arch, seed=3)
    q = make_tiny_triple(tmp_path / "b", arch=arch, seed=3)
    for d in (p.base, p.itm, p.lrm):
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        assert len(set(idx["weight_map"].values())) > 1, "checkpoint must be sharded"
        assert (d / "tokenizer.json").exists()
    idx = json.loads((p.itm / "model.safetensors.index.json").read_text())["weight_map"]
    idx_b = json.loads((p.base / "model.safetensors.index.json").read_text())["weight_map"]

    def get(d, m, name):
        with safe_open(str(d / m[name]), "pt") as f:
            return f.get_tensor(name)

    name = "model.layers.1.mlp.down_proj.weight"
    w_b, w_i = get(p.base, idx_b, name), get(p.itm, idx, name)
    rel = float((w_i - w_b).norm() / w_b.norm())
    assert 0.01 < rel < 0.1
    assert torch.equal(w_i, get(q.itm, idx, name))
    if arch == "qwen2":
        bn = "model.layers.0.self_attn.q_proj.bias"
        assert not torch.equal(get(p.itm, idx, bn), get(p.base, idx_b, bn))
    from transformers import AutoConfig, AutoTokenizer
    cfg = AutoConfig.from_pretrained(p.lrm)
    tok = AutoTokenizer.from_pretrained(p.lrm)
    assert cfg.vocab_size == len(tok) and cfg.num_key_value_heads == 2
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True).endswith("<think>\n")
