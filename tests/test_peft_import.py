"""PEFT LoRA import: attach a PEFT directory with its scale folded; unsupported variants fail clearly."""

from __future__ import annotations

import json

import pytest
import torch

from rain_adapter import RainAdapter, RainConfig, compute_fingerprint, save_adapter
from rain_adapter.format.peft_lora import PeftImportError, load_peft_lora
from rain_adapter.testing.tiny import random_deltas, tiny_model

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402


def _rel(a, b):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _peft_dir(tmp_path, arch: str, name: str = "lora", seed: int = 0, **cfg):
    """A PEFT-native LoRA with random (non-zero) lora_B, saved with save_pretrained."""
    model = tiny_model(arch, seed=0)
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    kw.update(cfg)
    pm = get_peft_model(model, LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(tmp_path / name)
    return tmp_path / name, pm.eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    "arch,cfg",
    [
        ("qwen2", {}),
        ("llama", {"use_rslora": True, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
        ("qwen2", {"lora_bias": True, "target_modules": ["q_proj", "v_proj"]}),
    ],
)
def test_attach_peft_dir_equals_peft_at_lambda_1(tmp_path, arch, cfg, ids):
    path, pm = _peft_dir(tmp_path, arch, **cfg)
    config, deltas = load_peft_lora(path)
    assert config.method == "peft-import" and config.storage == "lowrank"
    want_roles = ["q", "v"] if "target_modules" in cfg else ["q", "v", "down"]
    assert config.target_modules == want_roles
    rm = RainAdapter.attach(tiny_model(arch, seed=0), path)          # via store.load_adapter -> load_peft_lora
    bare = tiny_model(arch, seed=0)
    with torch.no_grad():
        want = pm(ids).logits
        assert _rel(rm(ids).logits, want) <= 1e-5
        # λ knob: 0 is the bare model, 0.5 lies between
        assert _rel(rm(ids, rain_lambda=0.0).logits, bare(ids).logits) == 0.0
        half = rm(ids, rain_lambda=0.5).logits
    assert 0 < _rel(half, want) < _rel(bare(ids).logits, want)


def test_export_then_import_round_trip(tmp_path, ids):
    from rain_adapter.export.peft import export_peft

    model = tiny_model("qwen2", seed=0)
    deltas = random_deltas(model, rank=3, scale=0.3, seed=4)
    cfg = RainConfig(layers=[0, 1], storage="lowrank", rank=3, fingerprint=compute_fingerprint(model, list(deltas)))
    path = save_adapter(deltas, cfg, tmp_path / "adapter")
    out = export_peft(path, tmp_path / "peft", lam=0.5, progress=False)
    _, back = load_peft_lora(out)
    assert set(back) == set(deltas)
    for k, d in deltas.items():
        assert torch.allclose(back[k].dense(), 0.5 * d.dense(), atol=1e-7)
    a = RainAdapter.attach(tiny_model("qwen2", seed=0), out, lam=1.0)
    b = RainAdapter.attach(tiny_model("qwen2", seed=0), path, lam=0.5)
    with torch.no_grad():
        assert _rel(a(ids).logits, b(ids).logits) <= 1e-6


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"use_dora": True}, "use_dora"),
        ({"target_modules": ["embed_tokens", "q_proj"]}, "embed"),
        ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_unsupported_peft_variants_fail_clearly(tmp_path, cfg, match):
    path, _ = _peft_dir(tmp_path, "llama", **cfg)
    with pytest.raises(PeftImportError, match=match):
        load_peft_lora(path)
    with pytest.raises(ValueError, match=match):
        RainAdapter.attach(tiny_model("llama", seed=0), path)


def test_bad_peft_dirs(tmp_path):
    path, _ = _peft_dir(tmp_path, "qwen2")
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PeftImportError, match="peft_type"):
        load_peft_lora(path)
    cfg["peft_type"] = "LORA"
    cfg["r"] = 5
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PeftImportError, match="rank 4 but the config"):
        load_peft_lora(path)
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(PeftImportError, match="pickle"):
        load_peft_lora(path)
