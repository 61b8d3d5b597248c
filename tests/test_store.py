"""Adapter directory format: round trips, sharding, resolution, atomic writes and bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from rain_adapter import (
    AdapterError,
    AdapterNotFoundError,
    ConfigError,
    ModuleDelta,
    RainAdapter,
    RainLinear,
    load_adapter,
    resolve_adapter,
    save_adapter,
)
from rain_adapter.cli.main import main as rain_main
from rain_adapter.format.store import INDEX_NAME, WEIGHTS_NAME
from rain_adapter.testing.tiny import tiny_model
from test_attach import ids, make_adapter, rel_err


def untouched(model):
    return not any(isinstance(m, RainLinear) for m in model.modules())


@pytest.fixture
def qwen():
    return tiny_model("qwen2", seed=31)


@pytest.mark.parametrize("rank", [None, 3])
def test_round_trip_save_load_attach(tmp_path, qwen, rank):
    cfg, deltas = make_adapter(qwen, rank=rank, seed=32, bias=True)
    path = save_adapter(deltas, cfg, tmp_path / "ad")
    assert (path / "adapter_config.json").is_file() and (path / WEIGHTS_NAME).is_file()
    assert (path / "README.md").read_text().startswith("# RAIN adapter")
    cfg2, deltas2 = load_adapter(path)
    assert cfg2 == cfg
    assert set(deltas2) == set(deltas)
    for k, d in deltas.items():
        for suffix, t in d.tensors().items():
            assert torch.equal(deltas2[k].tensors()[suffix], t)
    x = ids(seed=33)
    rm_mem = RainAdapter.attach(tiny_model("qwen2", seed=31), (cfg, deltas), lam=0.8)
    rm_disk = RainAdapter.attach(qwen, path, lam=0.8)
    with torch.no_grad():
        assert torch.equal(rm_mem(x).logits, rm_disk(x).logits)
    # merge(λ) equals the attached model at λ
    plain = tiny_model("qwen2", seed=0)
    plain.load_state_dict(rm_disk.merged_state_dict(0.8))
    with torch.no_grad():
        assert rel_err(plain(x).logits, rm_disk(x).logits) <= 1e-5


def test_sharded_adapter_with_index(tmp_path, qwen):
    cfg, deltas = make_adapter(qwen, seed=34)
    path = save_adapter(deltas, cfg, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((path / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (path / WEIGHTS_NAME).exists()
    _, back = load_adapter(path)
    assert all(torch.equal(back[k].delta, d.delta) for k, d in deltas.items())


def test_resolve_by_name_in_adapter_home(tmp_path, monkeypatch, qwen):
    monkeypatch.setenv("RAIN_ADAPTER_HOME", str(tmp_path / "home"))
    cfg, deltas = make_adapter(qwen, seed=35)
    save_adapter(deltas, cfg, tmp_path / "home" / "rain-tiny")
    assert resolve_adapter("rain-tiny") == tmp_path / "home" / "rain-tiny"
    rm = RainAdapter.attach(qwen, "rain-tiny")
    assert len(rm.rain_layers) == len(deltas)


def test_unknown_name_lists_where_it_looked(qwen):
    with pytest.raises(AdapterNotFoundError) as e:
        RainAdapter.attach(qwen, "someone/no-such-adapter")
    msg = str(e.value)
    assert "directory" in msg and "adapter home" in msg and "Hugging Face Hub" in msg
    assert untouched(qwen)


def test_atomic_write_leaves_nothing_on_failure(tmp_path, qwen):
    cfg, deltas = make_adapter(qwen, seed=36)
    bad = dict(deltas)
    first = next(iter(bad))
    bad[first] = ModuleDelta(delta=torch.full_like(deltas[first].delta, float("nan")))
    with pytest.raises(AdapterError, match=first):
        save_adapter(bad, cfg, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    save_adapter(deltas, cfg, tmp_path / "out")
    with pytest.raises(FileExistsError):
        save_adapter(deltas, cfg, tmp_path / "out")
    save_adapter(deltas, cfg, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------ bad input, model untouched
def _saved(tmp_path, model, **kw):
    cfg, deltas = make_adapter(model, seed=37, **kw)
    return save_adapter(deltas, cfg, tmp_path / "ad")


def test_truncated_safetensors(tmp_path, qwen):
    path = _saved(tmp_path, qwen)
    f = path / WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        RainAdapter.attach(qwen, path)
    assert untouched(qwen)


def test_corrupt_safetensors_header(tmp_path, qwen):
    path = _saved(tmp_path, qwen)
    (path / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(AdapterError, match=WEIGHTS_NAME):
        RainAdapter.attach(qwen, path)
    assert untouched(qwen)


@pytest.mark.parametrize("field", ["format_version", "storage", "target_modules"])
def test_config_missing_field(tmp_path, qwen, field):
    path = _saved(tmp_path, qwen)
    cfg = json.loads((path / "adapter_config.json").read_text())
    del cfg[field]
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=field):
        RainAdapter.attach(qwen, path)
    assert untouched(qwen)


def test_config_unknown_format_version_and_bad_values(tmp_path, qwen):
    path = _saved(tmp_path, qwen)
    cfg = json.loads((path / "adapter_config.json").read_text())
    for field, value in [("format_version", 99), ("storage", "sparse"), ("lambda_range", [1, 0]),
                         ("default_lambda", 7.0), ("format", "lora")]:
        broken = {**cfg, field: value}
        (path / "adapter_config.json").write_text(json.dumps(broken))
        with pytest.raises(ConfigError, match=field):
            RainAdapter.attach(qwen, path)
    (path / "adapter_config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_adapter(path)
    assert untouched(qwen)


def test_adapter_for_another_model_fingerprint(tmp_path, qwen):
    path = _saved(tmp_path, qwen)
    other = tiny_model("qwen2", seed=999)
    with pytest.raises(AdapterError, match="weights differ"):
        RainAdapter.attach(other, path)
    assert untouched(other)
    RainAdapter.attach(other, path, check_fingerprint=False)  # explicit override works


def test_shape_mismatch_names_the_module(tmp_path, qwen):
    path = _saved(tmp_path, qwen)
    wide = tiny_model("qwen2", seed=31, intermediate_size=96)
    with pytest.raises(AdapterError, match=r"mlp\.(gate|up|down)_proj"):
        RainAdapter.attach(wide, path, check_fingerprint=False)
    assert untouched(wide)


def test_nan_in_a_stored_delta(tmp_path, qwen):
    path = _saved(tmp_path, qwen)
    tensors = load_file(str(path / WEIGHTS_NAME))
    key = "model.layers.1.mlp.up_proj.rain_delta"
    tensors[key][3, 5] = float("nan")
    save_file(tensors, str(path / WEIGHTS_NAME))
    with pytest.raises(AdapterError, match=r"model\.layers\.1\.mlp\.up_proj"):
        RainAdapter.attach(qwen, path)
    assert untouched(qwen)


def test_in_memory_bad_delta_leaves_model_untouched(qwen):
    cfg, deltas = make_adapter(qwen, seed=38)
    deltas["model.layers.1.self_attn.o_proj"] = ModuleDelta(delta=torch.zeros(64, 32))
    with pytest.raises(AdapterError, match="o_proj"):
        RainAdapter.attach(qwen, (cfg, deltas), check_fingerprint=False)
    assert untouched(qwen)
    deltas = dict(make_adapter(qwen, seed=38)[1])
    deltas["model.layers.0.mlp.not_a_module"] = ModuleDelta(delta=torch.zeros(4, 4))
    with pytest.raises(AdapterError, match="not_a_module"):
        RainAdapter.attach(qwen, (cfg, deltas), check_fingerprint=False)
    assert untouched(qwen)


def test_rain_info_cli(tmp_path, qwen, capsys):
    path = _saved(tmp_path, qwen, rank=2)
    assert rain_main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "storage      lowrank (rank 2)" in out and "modules      14" in out
    assert rain_main(["info", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["storage"] == "lowrank"
    assert rain_main(["info", str(tmp_path / "missing")]) == 2


def test_format_v1_adapter_is_refused_naming_file_and_field(tmp_path, capsys):
    """Adapters are written in format version 2 (low-rank keys ``lora_A`` / ``lora_B``), the only
    version read: a config of version 1 (whose files named the factors ``rain_A`` / ``rain_B``) is a
    ConfigError naming the file, the field and the supported version; version-1 keys under a
    version-2 config are an AdapterError naming the key."""
    from rain_adapter.format.config import FORMAT_VERSION, RainConfig
    from rain_adapter.testing.tiny import random_deltas

    model = tiny_model("qwen2")
    deltas = random_deltas(model, rank=3, seed=11, bias=True)
    v2 = save_adapter(deltas, RainConfig(base_model_name_or_path="tiny", storage="lowrank", rank=3,
                                          layers=[0, 1]), tmp_path / "v2")
    flat = load_file(str(v2 / WEIGHTS_NAME))
    assert any(k.endswith(".lora_A") for k in flat) and not any(k.endswith(".rain_A") for k in flat)
    cfg = json.loads((v2 / "adapter_config.json").read_text())
    assert cfg["format_version"] == FORMAT_VERSION == 2

    # written by hand: a version-1 adapter directory
    v1 = tmp_path / "v1"
    v1.mkdir()
    old_keys = {k.replace(".lora_A", ".rain_A").replace(".lora_B", ".rain_B"): t for k, t in flat.items()}
    save_file(old_keys, str(v1 / WEIGHTS_NAME))
    (v1 / "adapter_config.json").write_text(json.dumps({**cfg, "format_version": 1}))
    want = re.escape(f"{v1 / 'adapter_config.json'}: field 'format_version' is 1; this library reads "
                     "format version 2 only")
    with pytest.raises(ConfigError, match=want):
        load_adapter(v1)
    with pytest.raises(ConfigError, match=want):
        RainAdapter.attach(model, v1)
    assert untouched(model)
    assert rain_main(["info", str(v1)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "adapter_config.json" in err and "'format_version' is 1" in err

    # version-1 keys under a version-2 config: the unexpected key is named
    (v1 / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"unexpected tensor key '.*\.rain_[AB]'"):
        load_adapter(v1)
