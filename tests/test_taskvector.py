"""Streamed task vectors from sharded safetensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from rain_adapter.testing.fixtures import make_tiny_triple
from rain_adapter.merging.taskvector import (CheckpointError, CheckpointReader, check_task_vector,
                                     iter_task_vectors)


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    return make_tiny_triple(tmp_path_factory.mktemp("tv"), arch="qwen2", seed=1)


def _expected(n_layers=2):
    from rain_adapter.testing.fixtures import tiny_triple_config
    cfg = tiny_triple_config("qwen2")
    h, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    shapes = {"self_attn.q_proj": ((h, h), True), "self_attn.k_proj": ((kv, h), True),
              "self_attn.v_proj": ((kv, h), True), "self_attn.o_proj": ((h, h), False),
              "mlp.gate_proj": ((f, h), False), "mlp.up_proj": ((f, h), False), "mlp.down_proj": ((h, f), False)}
    return {f"model.layers.{i}.{k}": v for i in range(n_layers) for k, v in shapes.items()}


def test_streaming_matches_full_load_and_counts(triple):
    from transformers import AutoModelForCausalLM
    exp = _expected()
    itm, base = CheckpointReader(triple.itm, "ITM"), CheckpointReader(triple.base, "base")
    gen = iter_task_vectors(itm, base, exp, merge_bias=True)
    name, first = next(gen)
    # only the first module's weight + bias from each checkpoint were materialised
    assert itm.loaded == 2 and base.loaded == 2
    deltas = {name: first, **dict(gen)}
    n_bias = sum(1 for (_, b) in exp.values() if b)
    assert itm.loaded == len(exp) + n_bias and base.loaded == len(exp) + n_bias
    mi = AutoModelForCausalLM.from_pretrained(triple.itm, dtype=torch.float32).state_dict()
    mb = AutoModelForCausalLM.from_pretrained(triple.base, dtype=torch.float32).state_dict()
    for n, d in deltas.items():
        torch.testing.assert_close(d.delta, mi[n + ".weight"] - mb[n + ".weight"], rtol=0, atol=0)
        if exp[n][1]:
            torch.testing.assert_close(d.bias, mi[n + ".bias"] - mb[n + ".bias"], rtol=0, atol=0)
            assert d.bias.abs().max() > 0
        else:
            assert d.bias is None
    nob = dict(iter_task_vectors(triple.itm, triple.base, exp, merge_bias=False))
    assert all(d.bias is None for d in nob.values())


def test_single_file_checkpoint(tmp_path, triple):
    exp = dict(list(_expected(1).items())[:2])
    for which in ("itm", "base"):
        r = CheckpointReader(getattr(triple, which))
        (tmp_path / which).mkdir()
        save_file({k: r.get(k) for k in r.keys()}, str(tmp_path / which / "model.safetensors"))
    d = dict(iter_task_vectors(tmp_path / "itm", tmp_path / "base", exp))
    d2 = dict(iter_task_vectors(triple.itm, triple.base, exp))
    for n in exp:
        assert torch.equal(d[n].delta, d2[n].delta)


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_missing_and_misshaped_tensor(tmp_path, triple):
    exp = _expected()
    bad = _copy(triple.itm, tmp_path / "itm")
    idx = json.loads((bad / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    del idx["weight_map"][name]
    (bad / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj.*ITM"):
        check_task_vector(CheckpointReader(bad, "ITM"), CheckpointReader(triple.base, "base"), exp)
    exp2 = dict(exp)
    exp2["model.layers.0.self_attn.k_proj"] = ((64, 64), True)
    with pytest.raises(CheckpointError, match=r"k_proj.*shape \[32, 64\]"):
        check_task_vector(CheckpointReader(triple.itm, "ITM"), CheckpointReader(triple.base, "base"), exp2)


def test_unreadable_shard(tmp_path, triple):
    bad = _copy(triple.base, tmp_path / "base")
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match=str(shard.name)):
        r = CheckpointReader(bad, "base")
        check_task_vector(CheckpointReader(triple.itm, "ITM"), r, _expected())
    with pytest.raises(CheckpointError, match="no such directory"):
        CheckpointReader(tmp_path / "nope")
