"""attach on quantized bases: torchao weight-only int8 / int4 and optimum-quanto int8 / int4 (CPU).

The base stays quantized (its own matmul); the delta and λ run beside it in the compute dtype. The
reference is float64: every quantized linear replaced by its dequantized weight, the targets by
``W_deq + λ·D`` (and ``b + λ·d_b``). Skipped when the backend is not installed (the optional extra
``rain-adapter[quant]`` installs torchao).
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from rain_adapter import RainAdapter, RainConfig, RainLinear
from rain_adapter.format.arch import ROLES
from rain_adapter.format.fingerprint import compute_fingerprint
from rain_adapter.format.store import AdapterError
from rain_adapter.runtime.dispatchers import DISPATCHERS, dispatch
from rain_adapter.testing.tiny import random_deltas, tiny_model

HAVE_TORCHAO = importlib.util.find_spec("torchao") is not None
HAVE_QUANTO = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None


def quantize_torchao(model, kind):
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    cfg = Int8WeightOnlyConfig() if kind == "int8" else IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                               granularity=PerGroup(32))
    quantize_(model, cfg)
    return model


def quantize_quanto(model, kind):
    from optimum.quanto import freeze, qint4, qint8, quantize
    quantize(model, weights=qint8 if kind == "int8" else qint4)
    freeze(model)
    return model


BACKENDS = [
    pytest.param("torchao", "int8", marks=pytest.mark.skipif(not HAVE_TORCHAO, reason="torchao not installed")),
    pytest.param("torchao", "int4", marks=pytest.mark.skipif(not HAVE_TORCHAO, reason="torchao not installed")),
    pytest.param("optimum-quanto", "int8", marks=pytest.mark.skipif(not HAVE_QUANTO, reason="optimum-quanto not installed")),
    pytest.param("optimum-quanto", "int4", marks=pytest.mark.skipif(not HAVE_QUANTO, reason="optimum-quanto not installed")),
]


def quantized(backend, kind, seed):
    model = tiny_model("qwen2", seed=seed, num_hidden_layers=2)
    q = copy.deepcopy(model)
    (quantize_torchao if backend == "torchao" else quantize_quanto)(q, kind)
    return model, q


def dequantized_reference(q, deltas, lam):
    """float64 copy of the quantized model with plain linears holding the dequantized weights and
    the targets ``W_deq + λ D``, ``b + λ d_b``."""
    ref = tiny_model("qwen2", seed=0, num_hidden_layers=2).double()
    qmods = dict(q.named_modules())
    with torch.no_grad():
        ref.load_state_dict({k: v.double() for k, v in q.state_dict().items()
                             if type(v) in (torch.Tensor, nn.Parameter)}, strict=False)
        for name, mod in ref.named_modules():
            if isinstance(mod, nn.Linear):
                qm = qmods[name]
                qm = qm.base if isinstance(qm, RainLinear) else qm
                w = dispatch(qm, name).dense(qm, qm.weight).double()
                if name in deltas:
                    w = w + lam * deltas[name].dense(torch.float64)
                    if deltas[name].bias is not None:
                        mod.bias.copy_(qm.bias.double() + lam * deltas[name].bias.double())
                mod.weight.copy_(w)
    return ref


def adapter(model, rank, seed=7):
    deltas = random_deltas(model, rank=rank, seed=seed, bias=True, scale=0.3)
    cfg = RainConfig(base_model_name_or_path="tiny", target_modules=list(ROLES), layers=[0, 1],
                     storage="lowrank" if rank else "dense", rank=rank,
                     fingerprint=compute_fingerprint(model, deltas))  # of the float model
    return cfg, deltas


def ids(batch=3, t=6):
    return torch.randint(0, 128, (batch, t), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("backend,kind", BACKENDS)
@pytest.mark.parametrize("rank", [None, 4], ids=["dense", "lowrank"])
def test_quantized_attach_equals_dequantized_plus_delta(backend, kind, rank):
    model, q = quantized(backend, kind, seed=21)
    cfg, deltas = adapter(model, rank)
    x = ids()
    with torch.no_grad():
        bare = q(x).logits.clone()
    wtypes = {n: type(m.weight) for n, m in q.named_modules() if n in deltas}
    rm = RainAdapter.attach(q, (cfg, deltas), lam=0.6)  # fingerprint of the float LRM: quantization tolerance
    assert isinstance(rm, nn.Module)
    for name, layer in rm.rain_layers.items():
        assert layer.dispatcher.backend == backend and layer.path == "beside"
        assert type(layer.base.weight) is wtypes[name]  # the base stays quantized
        d = layer.lora_A if layer.lora_A is not None else layer.rain_delta
        assert d.dtype == torch.float32 and type(d) is torch.Tensor
    with torch.no_grad():
        assert torch.equal(rm(x, rain_lambda=0.0).logits, bare)  # λ = 0: exactly the quantized model
        for lam in (0.6, [0.0, 0.6, 1.5]):
            got = rm(x, rain_lambda=lam).logits.double()
            rows = [lam] * 3 if isinstance(lam, float) else lam
            for r, lr in enumerate(rows):
                want = dequantized_reference(q, deltas, lr)(x[r:r + 1]).logits[0]
                err = float((got[r] - want).norm() / want.norm())
                # fp32 arithmetic of a fp32 model against float64: the quantization error is in both
                assert err < 1e-5, (lam, r, err)
        assert float((rm(x, rain_lambda=0.6).logits - bare).abs().max()) > 1e-3


@pytest.mark.parametrize("backend,kind", BACKENDS)
def test_quantized_merge_is_dequantized_plus_delta(backend, kind):
    model, q = quantized(backend, kind, seed=22)
    cfg, deltas = adapter(model, 4)
    rm = RainAdapter.attach(q, (cfg, deltas))
    merged = rm.merge(0.6)
    mods = dict(q.named_modules())
    for name, d in deltas.items():
        base = mods[name].base
        want = (dispatch(base, name).dense(base, base.weight).double() + 0.6 * d.dense(torch.float64)).float()
        torch.testing.assert_close(merged[f"{name}.weight"], want, rtol=1e-6, atol=1e-6)
    bare = rm.detach()
    assert not any(isinstance(m, RainLinear) for m in bare.modules())
    assert all(dispatch(mods_b, n).backend == backend for n, mods_b in bare.named_modules() if n in deltas)


@pytest.mark.parametrize("backend,kind", BACKENDS)
def test_quantized_fingerprint_still_catches_another_model(backend, kind):
    model, q = quantized(backend, kind, seed=23)
    other = tiny_model("qwen2", seed=99, num_hidden_layers=2)
    cfg, deltas = adapter(other, 4)
    with pytest.raises(AdapterError, match=f"dequantized {backend} weight"):
        RainAdapter.attach(q, (cfg, deltas))
    assert not any(isinstance(m, RainLinear) for m in q.modules())
    RainAdapter.attach(q, (cfg, deltas), check_fingerprint=False).detach()


@pytest.mark.skipif(not HAVE_TORCHAO, reason="torchao not installed")
def test_torchao_through_transformers_quantization_config(tmp_path):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig
    model = tiny_model("qwen2", seed=24, num_hidden_layers=2)
    model.save_pretrained(tmp_path)
    q = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                             quantization_config=TorchAoConfig(quant_type=Int8WeightOnlyConfig()))
    cfg, deltas = adapter(model, 4)
    rm = RainAdapter.attach(q, (cfg, deltas), lam=0.6)
    assert {layer.dispatcher.backend for layer in rm.rain_layers.values()} == {"torchao"}
    x = ids()
    with torch.no_grad():
        want = dequantized_reference(q, deltas, 0.6)(x).logits
        got = rm(x).logits.double()
    assert float((got - want).norm() / want.norm()) < 1e-5


@pytest.mark.skipif(not HAVE_QUANTO, reason="optimum-quanto not installed")
def test_quanto_through_transformers_quantization_config(tmp_path):
    from transformers import AutoModelForCausalLM, QuantoConfig
    model = tiny_model("qwen2", seed=27, num_hidden_layers=2)
    model.save_pretrained(tmp_path)
    q = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                             quantization_config=QuantoConfig(weights="int8"))
    cfg, deltas = adapter(model, 4)
    rm = RainAdapter.attach(q, (cfg, deltas), lam=0.6)
    assert {layer.dispatcher.backend for layer in rm.rain_layers.values()} == {"optimum-quanto"}
    x = ids()
    with torch.no_grad():
        want = dequantized_reference(q, deltas, 0.6)(x).logits
        got = rm(x).logits.double()
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_known_backends_without_a_dispatcher_are_refused_by_name():
    """The slots match layers by the package that defines them; a layer class defined under
    ``bitsandbytes.nn`` (as bitsandbytes' own Linear4bit is) is refused naming module and backend."""
    slots = {d.backend for d in DISPATCHERS if d.unsupported}
    assert {"bitsandbytes", "GPTQ", "AWQ", "HQQ"} <= slots
    layer_cls = type("Linear4bit", (nn.Linear,), {"__module__": "bitsandbytes.nn.modules"})
    model = tiny_model("qwen2", seed=25, num_hidden_layers=2)
    cfg, deltas = adapter(model, 4)
    name = "model.layers.1.mlp.up_proj"
    model.get_submodule(name).__class__ = layer_cls
    with pytest.raises(AdapterError, match=rf"module '{name}': is Linear4bit \(bitsandbytes\): .*no RAIN dispatcher"):
        RainAdapter.attach(model, (cfg, deltas))
    assert not any(isinstance(m, RainLinear) for m in model.modules())


def test_not_a_linear_is_refused_naming_the_backends():
    model = tiny_model("qwen2", seed=26, num_hidden_layers=2)
    cfg, deltas = adapter(model, 4)
    name = "model.layers.0.self_attn.o_proj"
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, nn.Identity())
    with pytest.raises(AdapterError, match=r"is Identity, expected nn.Linear or a quantized linear of a supported "
                                           r"backend \(optimum-quanto, torchao, linear\)"):
        RainAdapter.attach(model, (cfg, deltas))
