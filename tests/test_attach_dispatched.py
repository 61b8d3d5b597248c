"""attach on an accelerate-dispatched model: layers on ``cpu`` and on ``disk`` (real offload hooks).

The tiny LRM is saved and loaded twice with transformers: plainly, and with a ``device_map`` that
puts layer 0 on the CPU and layers 1-2 on disk (accelerate's AlignDevicesHook, weights on ``meta``
at rest, read from the offload folder per forward). The adapter attached to both must give the same
logits at λ = 0, 0.6 and per-row λ, the same merge, and leave the offload hooks working; attaching
must read no offloaded weight beyond the fingerprint's one-module-at-a-time sample.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("accelerate")
from transformers import AutoModelForCausalLM  # noqa: E402

from rain_adapter import RainAdapter, RainConfig, RainLinear  # noqa: E402
from rain_adapter.format.arch import ROLES  # noqa: E402
from rain_adapter.format.fingerprint import compute_fingerprint  # noqa: E402
from rain_adapter.format.store import AdapterError  # noqa: E402
from rain_adapter.testing.tiny import random_deltas, tiny_model  # noqa: E402

LAYERS = 3
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("dispatched")
    model = tiny_model("qwen2", seed=11, num_hidden_layers=LAYERS)
    model.save_pretrained(root / "lrm")
    return root


def load(root, dispatched: bool):
    if not dispatched:
        return AutoModelForCausalLM.from_pretrained(root / "lrm", dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(root / "lrm", dtype=torch.float32, device_map=DEVICE_MAP,
                                                offload_folder=str(root / "offload")).eval()


def adapter_for(model, rank, seed=5):
    deltas = random_deltas(model, rank=rank, seed=seed, bias=True, scale=0.3)
    cfg = RainConfig(base_model_name_or_path="tiny", target_modules=list(ROLES), layers=list(range(LAYERS)),
                     storage="lowrank" if rank else "dense", rank=rank,
                     fingerprint=compute_fingerprint(model, deltas))
    return cfg, deltas


def ids(batch=3, t=7, seed=2):
    return torch.randint(0, 128, (batch, t), generator=torch.Generator().manual_seed(seed))


def offloaded_names(model):
    return [n for n, m in model.named_modules()
            if getattr(getattr(m, "_hf_hook", None), "offload", False) and n.endswith("_proj")]


@pytest.mark.parametrize("rank", [None, 4], ids=["dense", "lowrank"])
def test_dispatched_attach_equals_plain_attach(saved, rank):
    plain, disp = load(saved, False), load(saved, True)
    assert offloaded_names(disp), "the device map offloads nothing: the test would prove nothing"
    adapter = adapter_for(plain, rank)
    rp = RainAdapter.attach(plain, adapter, lam=0.6)
    rd = RainAdapter.attach(disp, adapter, lam=0.6)  # fingerprint checked through the hooks' weights_map
    # offloaded layers stay offloaded (meta at rest) and run beside their hook; layer 0 stays fused
    paths = rd.rain_paths()
    for name, layer in rd.rain_layers.items():
        off = ".layers.0." not in name
        assert (layer.base.weight.device.type == "meta") == off, name
        assert paths[name] == ("beside" if off else "fused"), name
        assert layer.lora_A is None or layer.lora_A.device.type == "cpu"
    x = ids()
    with torch.no_grad():
        for lam in (0.0, 0.6, [0.0, 0.6, 1.3]):
            a = rp(x, rain_lambda=lam).logits
            b = rd(x, rain_lambda=lam).logits
            assert torch.isfinite(b).all()
            torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5, msg=f"λ = {lam}")
        # per-row λ means per row: row 1 of the mixed batch is the λ = 0.6 run's row 1
        mixed = rd(x, rain_lambda=[0.0, 0.6, 1.3]).logits
        torch.testing.assert_close(mixed[1], rd(x, rain_lambda=0.6).logits[1], rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(mixed[0], rd(x, rain_lambda=0.0).logits[0], rtol=2e-5, atol=2e-5)
        assert (mixed[1] - mixed[0]).abs().max() > 1e-3  # λ changes something
    for name in offloaded_names(disp):
        assert disp.get_submodule(name).base.weight.device.type == "meta"  # forwards put them back


def test_dispatched_merge_detach_generate(saved, tmp_path):
    plain, disp = load(saved, False), load(saved, True)
    adapter = adapter_for(plain, 4)
    rp = RainAdapter.attach(plain, adapter, lam=0.6)
    rd = RainAdapter.attach(disp, adapter, lam=0.6)
    mp, md = rp.merge(0.6), rd.merge(0.6)  # offloaded W read through the hook, never written back
    assert mp.keys() == md.keys()
    for k in mp:
        torch.testing.assert_close(md[k], mp[k], rtol=0, atol=0, msg=k)
    sp, sd = rp.merged_state_dict(0.6), rd.merged_state_dict(0.6)
    assert sp.keys() == sd.keys()
    assert all(v.device.type != "meta" for v in sd.values())
    for k in sp:
        torch.testing.assert_close(sd[k], sp[k], rtol=0, atol=0, msg=k)
    rd.save_pretrained(tmp_path / "merged", 0.6)  # a plain checkpoint, offloaded tensors read through the hooks
    saved_merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).state_dict()
    assert saved_merged.keys() == sp.keys()
    for k in sp:
        torch.testing.assert_close(saved_merged[k], sp[k], rtol=0, atol=0, msg=k)
    x = ids(batch=2, t=5)
    gp = rp.generate(x, rain_lambda=[0.0, 0.6], max_new_tokens=4, do_sample=False)
    gd = rd.generate(x, rain_lambda=[0.0, 0.6], max_new_tokens=4, do_sample=False)
    assert torch.equal(gp, gd)
    bare = rd.detach()
    assert bare is disp and not any(isinstance(m, RainLinear) for m in disp.modules())
    with torch.no_grad():
        torch.testing.assert_close(disp(x).logits, rp.detach()(x).logits, rtol=2e-5, atol=2e-5)
    assert all(disp.get_submodule(n).weight.device.type == "meta" for n in offloaded_names(disp))


def test_attach_reads_no_offloaded_weight(saved, monkeypatch):
    """Without the fingerprint check attach reads nothing from the offload; with it, each offloaded
    target's weight once (one module at a time)."""
    disp = load(saved, True)
    adapter = adapter_for(load(saved, False), 4)
    hooks = [disp.get_submodule(n)._hf_hook for n in offloaded_names(disp)]
    cls = type(hooks[0].weights_map)
    reads: list[str] = []
    orig = cls.__getitem__
    monkeypatch.setattr(cls, "__getitem__", lambda self, key: (reads.append(key), orig(self, key))[1])
    rm = RainAdapter.attach(disp, adapter, check_fingerprint=False)
    assert reads == []
    rm.detach()
    RainAdapter.attach(disp, adapter)
    assert sorted(reads) == ["weight"] * len(hooks)


def test_attach_refuses_device_argument_on_dispatched(saved):
    disp = load(saved, True)
    with pytest.raises(ValueError, match="dispatched by accelerate"):
        RainAdapter.attach(disp, adapter_for(load(saved, False), 4), device="cpu")
    assert not any(isinstance(m, RainLinear) for m in disp.modules())


_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    from rain_adapter import RainAdapter, RainConfig
    from rain_adapter.format.arch import ROLES
    from rain_adapter.format.fingerprint import compute_fingerprint
    from rain_adapter.testing.tiny import random_deltas
    root, mode = sys.argv[1], sys.argv[2]
    adapter = torch.load(root + "/adapter.pt", weights_only=False)
    kw = dict(dtype=torch.float32)
    if mode == "dispatched":
        kw.update(device_map=json.loads(sys.argv[3]), offload_folder=root + "/offload")
    model = AutoModelForCausalLM.from_pretrained(root + "/lrm", **kw).eval()
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS: what follows is the attach's peak
    rm = RainAdapter.attach(model, adapter, lam=0.6)
    with torch.no_grad():
        rm(torch.tensor([[1, 2, 3]]))
    print(json.dumps({"peak": status("VmHWM")}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_at_attach_below_plain(tmp_path):
    """A 4-layer model of ~180 MB (float32) with layers 1-3 on disk: the peak RSS of attach plus one
    forward stays well below the plain load's (which holds every layer)."""
    model = tiny_model("qwen2", seed=1, num_hidden_layers=4, hidden_size=1024, intermediate_size=2816,
                       num_attention_heads=8, num_key_value_heads=2, vocab_size=256)
    model.save_pretrained(tmp_path / "lrm")
    deltas = random_deltas(model, rank=8, seed=3)
    cfg = RainConfig(base_model_name_or_path="tiny", target_modules=list(ROLES), layers=list(range(4)),
                     storage="lowrank", rank=8, fingerprint=compute_fingerprint(model, deltas))
    torch.save((cfg, deltas), tmp_path / "adapter.pt")
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    del model
    dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
          "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    peaks = {}
    for mode in ("plain", "dispatched"):
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path), mode, json.dumps(dm)],
                             capture_output=True, text=True, timeout=600, env=os.environ.copy())
        assert out.returncode == 0, out.stderr[-3000:]
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    # three of four layers (≈ 3/4 of weight_bytes) are on disk; require half of the weights saved
    print(f"peak RSS at attach + one forward: {peaks}, weights {weight_bytes} B")
    assert peaks["dispatched"] < peaks["plain"] - weight_bytes // 2, (peaks, weight_bytes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_execution_with_cpu_and_disk_offload(saved):
    """On a GPU machine: layer 0 on cuda:0, layer 1 offloaded to the CPU and layer 2 to disk, both
    executed on cuda:0 — every delta sits on cuda:0 while the offloaded weights stay on meta."""
    dm = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": "disk",
          "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    plain = load(saved, False).cuda()
    disp = AutoModelForCausalLM.from_pretrained(saved / "lrm", dtype=torch.float32, device_map=dm,
                                                offload_folder=str(saved / "offload_gpu")).eval()
    adapter = adapter_for(plain, 4)
    rp = RainAdapter.attach(plain, adapter, lam=0.6)
    rd = RainAdapter.attach(disp, adapter, lam=0.6)
    for name, layer in rd.rain_layers.items():
        assert layer.lora_A.device == torch.device("cuda", 0), name
        assert (layer.base.weight.device.type == "meta") == (".layers.0." not in name), name
    x = ids().cuda()
    with torch.no_grad():
        for lam in (0.0, 0.6, [0.0, 0.6, 1.3]):
            torch.testing.assert_close(rd(x, rain_lambda=lam).logits, rp(x, rain_lambda=lam).logits,
                                       rtol=1e-4, atol=1e-4, msg=f"λ = {lam}")


def test_layers_offloaded_by_an_enclosing_hook_are_refused(saved):
    """accelerate's preload_module_classes offloads a whole MLP through one hook that finds its
    tensors by path; wrapping gate/up/down would rename them, so attach refuses, naming both."""
    from accelerate import cpu_offload
    model = load(saved, False)
    cpu_offload(model, execution_device="cpu", preload_module_classes=[type(model.model.layers[0].mlp).__name__])
    assert model.model.layers[0].mlp.gate_proj.weight.device.type == "meta"
    with pytest.raises(AdapterError, match=r"module 'model.layers.0.mlp.gate_proj': its weights are offloaded by the "
                                        r"hook of 'model.layers.0.mlp'"):
        RainAdapter.attach(model, adapter_for(load(saved, False), 4))
    assert not any(isinstance(m, RainLinear) for m in model.modules())
