"""Bad input to the loader and the Python API (issue 16, point 5): a clear error naming the file,
module, field or argument; never a hang, never NaN / Inf weights, never a half-attached model.

Covers: the fingerprint across load dtypes (scheme 2 only), PEFT pattern keys (no regex),
the λ bound in every Python entry point, strict config types and config-vs-tensor agreement,
regular files only inside the adapter directory (FIFO, /dev/zero, ``..``), and empty names.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from rain_adapter import (
    AdapterError,
    ConfigError,
    RainAdapter,
    RainConfig,
    RainLinear,
    compute_fingerprint,
    load_adapter,
    resolve_adapter,
    save_adapter,
)
from rain_adapter.format.config import CONFIG_NAME, read_json
from rain_adapter.format.fingerprint import check_fingerprint
from rain_adapter.format.lambdas import MAX_ABS_LAMBDA, LambdaRangeWarning, check_lambda, parse_lambdas
from rain_adapter.format.peft_lora import PeftImportError, _pattern_value, load_peft_lora
from rain_adapter.format.store import INDEX_NAME, WEIGHTS_NAME
from rain_adapter.testing.tiny import random_deltas, tiny_model
from test_attach import ids, make_adapter


def untouched(model):
    return not any(isinstance(m, RainLinear) for m in model.modules())


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def qwen():
    return tiny_model("qwen2", seed=41)


@pytest.fixture
def saved(tmp_path, qwen):
    cfg, deltas = make_adapter(qwen, seed=42, rank=3)
    return save_adapter(deltas, cfg, tmp_path / "ad")


def _edit_config(path, **fields):
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg.update(fields)
    (path / CONFIG_NAME).write_text(json.dumps(cfg))


# ------------------------------------------------------------------ 1. fingerprint across dtypes
@pytest.mark.parametrize("stored", [torch.float32, torch.float16, torch.bfloat16])
def test_fingerprint_matches_fp32_fp16_bf16_loads(tmp_path, stored):
    """One checkpoint loaded in float32, float16 or bfloat16: every load's fingerprint passes the
    check against every other's (float16 used to fail: double rounding, subnormals)."""
    from transformers import AutoModelForCausalLM

    tiny_model("qwen2", seed=43, dtype=stored).save_pretrained(tmp_path / "lrm")
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    models = {dt: AutoModelForCausalLM.from_pretrained(tmp_path / "lrm", dtype=dt).eval() for dt in dtypes}
    deltas = random_deltas(models[torch.float32], seed=44)
    for built in dtypes:
        cfg = RainConfig(base_model_name_or_path="tiny", layers=[0, 1],
                         fingerprint=compute_fingerprint(models[built], list(deltas)))
        for used in dtypes:
            check_fingerprint(cfg, models[used])
    RainAdapter.attach(models[torch.float16], (cfg, deltas)).detach()


def test_fingerprint_still_tells_models_apart(qwen):
    cfg, deltas = make_adapter(qwen, seed=45)
    other = tiny_model("qwen2", seed=46)
    with pytest.raises(AdapterError, match="weights differ"):
        RainAdapter.attach(other, (cfg, deltas))
    assert untouched(other)
    name = "model.layers.1.mlp.up_proj"
    with torch.no_grad():
        qwen.get_submodule(name).weight.mul_(1.01)  # 1 % off in one module: beyond any dtype round trip
    with pytest.raises(AdapterError, match=rf"{name}.*weights differ"):
        RainAdapter.attach(qwen, (cfg, deltas))
    assert untouched(qwen)


def test_old_scheme_fingerprint_record_is_refused_naming_file_and_field(saved, qwen):
    """Fingerprint records are scheme 2 only: in adapter_config.json (written by hand here) a record
    of the pre-release scheme 1 (``{"shape", "hash"}``, no ``scheme``) or of another scheme is a
    ConfigError naming the file, the field and the module, before anything is attached."""
    cfg = json.loads((saved / CONFIG_NAME).read_text())
    name = "model.layers.0.self_attn.q_proj"
    good = cfg["fingerprint"][name]
    assert good["scheme"] == 2 and set(good) == {"shape", "scheme", "sample"}
    for record, why in [({"shape": good["shape"], "hash": "0123456789abcdef"}, "has no 'scheme' field"),
                        ({**good, "scheme": 1}, "has field 'scheme' 1"),
                        ({**good, "scheme": "2"}, "has field 'scheme' '2'")]:
        _edit_config(saved, fingerprint={**cfg["fingerprint"], name: record})
        want = re.escape(f"{saved / CONFIG_NAME}: field 'fingerprint', module {name!r}: the record {why}; "
                         "this library reads fingerprint scheme 2 only")
        with pytest.raises(ConfigError, match=want):
            load_adapter(saved)
        with pytest.raises(ConfigError, match=want):
            RainAdapter.attach(qwen, saved)
        assert untouched(qwen)
    _edit_config(saved, fingerprint=cfg["fingerprint"])
    RainAdapter.attach(qwen, saved).detach()


@pytest.mark.parametrize("record,match", [
    ("nonsense", "malformed fingerprint"),
    ({"shape": [64, 64], "scheme": 2, "sample": "!!not base64!!"}, "sample"),
    ({"shape": [64, 64], "scheme": 2}, "sample"),
    ({"shape": [64, 64], "scheme": 7, "sample": ""}, "fingerprint record has field 'scheme' 7"),
    ({"shape": [64, 64], "hash": "0123456789abcdef"}, "fingerprint record has no 'scheme' field"),
])
def test_malformed_fingerprint_record_names_the_module(qwen, record, match):
    cfg, deltas = make_adapter(qwen, seed=50)
    cfg.fingerprint["model.layers.0.self_attn.q_proj"] = record
    with pytest.raises(AdapterError, match=rf"q_proj.*{match}"):
        RainAdapter.attach(qwen, (cfg, deltas))
    assert untouched(qwen)


# ------------------------------------------------------------------ 2. PEFT pattern keys
def _peft_dir(tmp_path, **cfg):
    """A hand-written PEFT LoRA directory (no peft needed): q_proj of layer 0 and 1, rank 4 (rank 2 for
    layer 0 when ``rank_pattern`` says so)."""
    root = tmp_path / "peft"
    root.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **cfg}
    (root / CONFIG_NAME).write_text(json.dumps(config))
    tensors = {}
    for layer in (0, 1):
        r = 2 if layer == 0 and cfg.get("rank_pattern") else 4
        key = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, 64)
        tensors[f"{key}.lora_B.weight"] = torch.randn(64, r)
    save_file(tensors, str(root / "adapter_model.safetensors"))
    return root


@pytest.mark.parametrize("key", ["(a+)+$", "(", "q_proj|k_proj", ".*", "layers.0.*"])
def test_peft_pattern_keys_that_are_not_plain_names_fail_fast(tmp_path, key):
    root = _peft_dir(tmp_path, rank_pattern={key: 2})
    start = time.monotonic()
    with pytest.raises(PeftImportError, match=rf"{CONFIG_NAME}.*rank_pattern.*not a plain module name"):
        load_peft_lora(root)
    with pytest.raises(ValueError, match="not a plain module name"):
        load_adapter(root)
    assert time.monotonic() - start < 5


def test_peft_pattern_plain_names_match_as_peft_does(tmp_path):
    module = "model.layers.0.self_attn.q_proj"
    for key in ("q_proj", "self_attn.q_proj", "layers.0.self_attn.q_proj", module):
        assert _pattern_value({key: 2}, module, 4) == 2
    for key in ("proj", "_proj", "layers.1.self_attn.q_proj", "k_proj", "0.self_attn.q"):
        assert _pattern_value({key: 2}, module, 4) == 4
    # a long module name and a backtracking-prone key: matched as strings, instantly
    assert _pattern_value({"a" * 40 + "!": 1}, "a" * 10_000, 4) == 4
    config, deltas = load_peft_lora(_peft_dir(tmp_path, rank_pattern={"layers.0.self_attn.q_proj": 2}))
    assert config.rank == {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 4}
    assert deltas["model.layers.0.self_attn.q_proj"].rank == 2


@pytest.mark.parametrize("cfg,match", [
    ({"rank_pattern": {"q_proj": True}}, "rank_pattern.*q_proj.*int > 0"),
    ({"rank_pattern": {"q_proj": "2"}}, "rank_pattern.*q_proj"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern.*object"),
    ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern.*q_proj.*number"),
    ({"r": True}, "'r'"),
    ({"r": -4}, "'r'"),
    ({"lora_alpha": "8"}, "lora_alpha"),
])
def test_peft_config_values_are_typed(tmp_path, cfg, match):
    with pytest.raises(PeftImportError, match=match):
        load_peft_lora(_peft_dir(tmp_path, **cfg))


# ------------------------------------------------------------------ 3. λ in the Python API
BAD_LAMBDAS = [float("nan"), float("inf"), -float("inf"), 1e38, MAX_ABS_LAMBDA + 0.5, -101, True, "0.5",
               [0.5, True], [0.5, float("nan")], torch.tensor([True])]


def test_check_lambda_hard_rules_and_range_warning():
    for bad in BAD_LAMBDAS:
        with pytest.raises(ValueError, match="^opt: "):
            check_lambda(bad, (0, 2), what="opt")
    with pytest.warns(LambdaRangeWarning):
        check_lambda([MAX_ABS_LAMBDA, -MAX_ABS_LAMBDA], (0, 2))  # the bound itself is allowed (warns)
    check_lambda(torch.tensor([0.0, 1.5]), (0, 2))
    with pytest.raises(ValueError, match="at most 100"):
        parse_lambdas("0,200")


@pytest.mark.parametrize("bad", BAD_LAMBDAS, ids=repr)
def test_bad_lambda_refused_everywhere_model_untouched(tmp_path, qwen, bad):
    rm = RainAdapter.attach(qwen, make_adapter(qwen, seed=51, bias=True), lam=0.5)
    before, lam_before = snapshot(rm.model), rm.get_lambda()
    x = ids(seed=52)
    calls = {
        "set_lambda(lam)": lambda: rm.set_lambda(bad),
        "set_token_lambda(lam)": lambda: rm.set_token_lambda(bad),
        "lambda_scope(lam)": lambda: rm.lambda_scope(bad).__enter__(),
        "generate(rain_lambda)": lambda: rm.generate(x, rain_lambda=bad, max_new_tokens=2, do_sample=False),
        "rain_lambda": lambda: rm(x, rain_lambda=bad),
        "merge(lam)": lambda: rm.merge(bad),
        "merged_state_dict(lam)": lambda: rm.merged_state_dict(bad),
        "save_pretrained(lam)": lambda: rm.save_pretrained(tmp_path / "merged", lam=bad),
    }
    for what, call in calls.items():
        with pytest.raises(ValueError) as e:
            call()
        assert what in str(e.value), (what, str(e.value))
        assert rm.get_lambda().tolist() == lam_before.tolist() and not rm._state.per_token
    assert same(snapshot(rm.model), before)
    assert not (tmp_path / "merged").exists()
    fresh = tiny_model("qwen2", seed=41)
    with pytest.raises(ValueError, match=r"attach\(lam\)"):
        RainAdapter.attach(fresh, make_adapter(fresh, seed=51), lam=bad)
    assert untouched(fresh)


def test_merge_that_overflows_the_dtype_is_an_error(tmp_path):
    model = tiny_model("qwen2", seed=53, dtype=torch.float16)
    deltas = {n: d.to(dtype=torch.float32) for n, d in random_deltas(model.float(), seed=54).items()}
    model = model.half()
    name = next(iter(deltas))
    deltas[name].delta.fill_(1000.0)
    cfg = RainConfig(base_model_name_or_path="tiny", layers=[0, 1])
    rm = RainAdapter.attach(model, (cfg, deltas))
    before = snapshot(rm.model)
    with pytest.warns(LambdaRangeWarning), pytest.raises(ValueError, match=rf"{name}.*not finite"):
        rm.save_pretrained(tmp_path / "merged", lam=100.0)   # 1000 * 100 > float16's 65504
    assert not (tmp_path / "merged").exists() and same(snapshot(rm.model), before)


def test_export_merged_refuses_bad_lambda_writes_nothing(tmp_path, qwen):
    from rain_adapter.export.merged import ExportError, export_merged

    qwen.save_pretrained(tmp_path / "lrm")
    cfg, deltas = make_adapter(qwen, seed=55)
    path = save_adapter(deltas, cfg, tmp_path / "ad")
    for bad in (float("inf"), True, 1e38, "1"):
        with pytest.raises(ExportError, match=r"export_merged\(lam\)"):
            export_merged(path, tmp_path / "out", lrm=tmp_path / "lrm", lam=bad, progress=False)
        assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 4. strict config types
@pytest.mark.parametrize("field,value", [
    ("format_version", True), ("format_version", "2"), ("format_version", 2.0),
    ("rank", -5), ("rank", 0), ("rank", True), ("rank", "3"), ("rank", {}), ("rank", {"m": 0}),
    ("storage", ["lowrank"]), ("storage", None),
    ("layers", [True]), ("layers", [-1]), ("layers", "0-1"), ("layers", [0.5]),
    ("default_lambda", True), ("default_lambda", "1"), ("lambda_range", [0, True]),
    ("lambda_range", [0, float("inf")]), ("base_model_name_or_path", 5), ("method", 3),
    ("itm_name_or_path", None), ("dtype", 16), ("format", 1), ("target_modules", [1]),
    ("recommended_lambda", True), ("recommended_lambda", "1"), ("recommended_lambda", float("nan")),
    ("recommended_lambda", 2.5), ("tune", []),   # 2.5: outside the default lambda_range [0, 2]
])
def test_config_field_types_are_strict(saved, field, value):
    _edit_config(saved, **{field: value})
    with pytest.raises(ConfigError, match=rf"{CONFIG_NAME}.*field '{field}'"):
        load_adapter(saved)


def test_lambda_range_beyond_the_hard_bound(saved):
    """The server accepts any λ inside ``lambda_range``: the range itself stays within |λ| <= 100."""
    for lr, default in (([0, 1000], 1.0), ([-101, 0], 0.0)):
        _edit_config(saved, lambda_range=lr, default_lambda=default)
        with pytest.raises(ConfigError, match=rf"{CONFIG_NAME}.*field 'lambda_range'.*100"):
            load_adapter(saved)


def test_storage_layers_and_rank_must_agree_with_the_tensors(tmp_path, qwen, saved):
    module = "model.layers.1.self_attn.q_proj"
    for fields, match in [({"storage": "dense"}, "lora_A / lora_B.*storage 'dense'"),
                          ({"layers": [0]}, "layer 1 is not in the config's layers"),
                          ({"rank": 2}, "rank 3 but the config's rank is 2"),
                          ({"rank": {module: 4}}, "rank 3 but the config's rank is 4")]:
        _edit_config(saved, rank=3, storage="lowrank", layers=[0, 1])
        _edit_config(saved, **fields)
        with pytest.raises(ConfigError, match=rf"{saved}.*module .*{match}"):
            load_adapter(saved)
    cfg, deltas = make_adapter(qwen, seed=56)
    dense = save_adapter(deltas, cfg, tmp_path / "dense")
    _edit_config(dense, storage="lowrank", rank=4)
    with pytest.raises(ConfigError, match="holds rain_delta tensors but the config says storage 'lowrank'"):
        load_adapter(dense)
    # a dense file with one low-rank module slipped in
    _edit_config(dense, storage="dense", rank=None)
    flat = load_file(str(dense / WEIGHTS_NAME))
    del flat[f"{module}.rain_delta"]
    flat[f"{module}.lora_A"], flat[f"{module}.lora_B"] = torch.zeros(2, 64), torch.zeros(64, 2)
    save_file(flat, str(dense / WEIGHTS_NAME))
    with pytest.raises(ConfigError, match=rf"module '{module}'.*storage 'dense'"):
        load_adapter(dense)


# ------------------------------------------------------------------ 5. regular files inside the directory
def test_fifo_weights_and_config_fail_without_hanging(tmp_path, saved, qwen):
    (saved / WEIGHTS_NAME).unlink()
    os.mkfifo(saved / WEIGHTS_NAME)                 # nobody writes: opening it would block forever
    with pytest.raises(AdapterError, match=rf"{WEIGHTS_NAME}: not a regular file"):
        RainAdapter.attach(qwen, saved)
    assert untouched(qwen)
    (saved / CONFIG_NAME).unlink()
    os.mkfifo(saved / CONFIG_NAME)
    with pytest.raises(ConfigError, match=rf"{CONFIG_NAME}: not a regular file"):
        load_adapter(saved)


def test_config_linked_to_dev_zero(saved):
    (saved / CONFIG_NAME).unlink()
    (saved / CONFIG_NAME).symlink_to("/dev/zero")   # endless: reading it would fill memory
    with pytest.raises(ConfigError, match=rf"{CONFIG_NAME}: (not a regular file|resolves to /dev/zero)"):
        load_adapter(saved)


def test_index_entries_must_stay_inside_the_directory(tmp_path, qwen):
    cfg, deltas = make_adapter(qwen, seed=57)
    path = save_adapter(deltas, cfg, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((path / INDEX_NAME).read_text())
    key, shard = next(iter(index["weight_map"].items()))
    (tmp_path / "x.safetensors").write_bytes((path / shard).read_bytes())
    for entry in ("../x.safetensors", str(tmp_path / "x.safetensors"), "sub/../../x.safetensors"):
        broken = {**index, "weight_map": {**index["weight_map"], key: entry}}
        (path / INDEX_NAME).write_text(json.dumps(broken))
        with pytest.raises(AdapterError, match=rf"{INDEX_NAME}: weight_map entry '{key}'"):
            load_adapter(path)
    # a shard that is a symlink out of the directory
    (path / INDEX_NAME).write_text(json.dumps(index))
    (path / shard).unlink()
    (path / shard).symlink_to(tmp_path / "x.safetensors")
    with pytest.raises(AdapterError, match=rf"{shard}: resolves to .*outside the adapter directory"):
        RainAdapter.attach(qwen, path)
    assert untouched(qwen)


def test_symlinks_inside_the_directory_and_hf_snapshots_load(tmp_path, saved):
    """Links that stay inside are fine, and so is the Hugging Face cache layout (snapshot files
    link to ``../../blobs/``)."""
    (saved / "weights.bin-real").write_bytes((saved / WEIGHTS_NAME).read_bytes())
    (saved / WEIGHTS_NAME).unlink()
    (saved / WEIGHTS_NAME).symlink_to("weights.bin-real")
    load_adapter(saved)
    repo = tmp_path / "models--me--ad"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (blobs / f"blob-{name}").write_bytes((saved / name).read_bytes())
        (snap / name).symlink_to(f"../../blobs/blob-{name}")
    assert len(load_adapter(snap)[1]) == 14


def test_json_reads_are_capped_and_depth_safe(tmp_path, saved):
    big = tmp_path / "big.json"
    big.write_text(" " * 200 + "{}")
    with pytest.raises(ValueError, match=r"big\.json: larger than 100 bytes"):
        read_json(big, ValueError, missing="gone", max_bytes=100)
    (saved / CONFIG_NAME).write_bytes(b" " * (16 * 2**20) + b"{}")
    with pytest.raises(ConfigError, match=rf"{CONFIG_NAME}: larger than"):
        load_adapter(saved)
    (saved / CONFIG_NAME).write_text("[" * 200_000)
    with pytest.raises(ConfigError, match=rf"{CONFIG_NAME}: not valid JSON"):
        load_adapter(saved)


def test_peft_fifo_weights_fail_without_hanging(tmp_path):
    root = _peft_dir(tmp_path)
    (root / "adapter_model.safetensors").unlink()
    os.mkfifo(root / "adapter_model.safetensors")
    with pytest.raises(PeftImportError, match="adapter_model.safetensors: not a regular file"):
        load_peft_lora(root)


# ------------------------------------------------------------------ 6. empty names
@pytest.mark.parametrize("name", ["", "   ", "\t\n"])
def test_empty_adapter_name(qwen, name):
    for call in (lambda: resolve_adapter(name), lambda: load_adapter(name), lambda: RainAdapter.attach(qwen, name)):
        with pytest.raises(ValueError, match="adapter name is empty"):
            call()
    assert untouched(qwen)
