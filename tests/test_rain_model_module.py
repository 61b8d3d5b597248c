"""RainModel is an nn.Module: isinstance, .to(), eval/train, state_dict / load_state_dict,
attribute forwarding both ways, torch.compile, and nesting inside another module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rain_adapter import RainAdapter, RainConfig, RainLinear, RainModel
from rain_adapter.format.arch import ROLES
from rain_adapter.format.fingerprint import compute_fingerprint
from rain_adapter.testing.tiny import random_deltas, tiny_model


def attached(seed=31, rank=4, lam=0.6):
    model = tiny_model("qwen2", seed=seed)
    deltas = random_deltas(model, rank=rank, seed=seed, bias=True, scale=0.3)
    cfg = RainConfig(base_model_name_or_path="tiny", target_modules=list(ROLES), layers=[0, 1],
                     storage="lowrank", rank=rank, fingerprint=compute_fingerprint(model, deltas))
    return RainAdapter.attach(model, (cfg, deltas), lam=lam), deltas


def ids(batch=2, t=6):
    return torch.randint(0, 128, (batch, t), generator=torch.Generator().manual_seed(8))


def test_is_a_module_and_forwards_attributes():
    rm, _ = attached()
    assert isinstance(rm, nn.Module) and isinstance(rm, RainModel)
    assert rm.config is rm.model.config and rm.device == rm.model.device
    assert rm.generation_config is rm.model.generation_config
    assert callable(rm.get_input_embeddings) and rm.get_input_embeddings() is rm.model.model.embed_tokens
    # setting an attribute RainModel does not own sets it on the wrapped model
    rm.rain_test_marker = 5
    assert rm.model.rain_test_marker == 5 and "rain_test_marker" not in rm.__dict__
    del rm.rain_test_marker
    assert not hasattr(rm.model, "rain_test_marker")
    with pytest.raises(AttributeError):
        rm.no_such_attribute_anywhere
    # the module tree: one child, the wrapped model
    assert [n for n, _ in rm.named_children()] == ["model"]
    assert sum(1 for m in rm.modules() if isinstance(m, RainLinear)) == len(rm.rain_layers)
    assert {id(p) for p in rm.parameters()} == {id(p) for p in rm.model.parameters()}


def test_eval_train_and_to_return_the_rain_model():
    rm, _ = attached()
    assert rm.train() is rm and rm.model.training and all(m.training for m in rm.modules())
    assert rm.eval() is rm and not rm.model.training
    moved = rm.to(torch.float64)
    assert moved is rm
    layer = next(iter(rm.rain_layers.values()))
    assert layer.base.weight.dtype == torch.float64 and layer.lora_A.dtype == torch.float64  # deltas move too
    x = ids()
    with torch.no_grad():
        y = rm(x).logits
    assert y.dtype == torch.float64 and torch.isfinite(y).all()


def test_state_dict_is_the_bare_models_and_round_trips():
    rm, _ = attached()
    bare_keys = set(tiny_model("qwen2", seed=31).state_dict())
    sd = rm.state_dict()
    assert set(sd) == bare_keys  # no "model." prefix, no ".base.", no RAIN deltas
    assert set(rm.model.state_dict()) == bare_keys
    fresh = tiny_model("qwen2", seed=77)
    fresh.load_state_dict(sd)  # strict
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, rm(x, rain_lambda=0.0).logits, rtol=0, atol=0)
    # and back: a bare state dict loads into the attached model (strict), deltas untouched
    other = tiny_model("qwen2", seed=78)
    rm.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rm(x, rain_lambda=0.0).logits, other(x).logits, rtol=0, atol=0)
    # nested in another module the prefix is that module's
    holder = nn.ModuleDict({"lm": rm})
    assert set(holder.state_dict()) == {f"lm.{k}" for k in bare_keys}
    holder.load_state_dict(holder.state_dict())
    # the merged checkpoint is still merged_state_dict's job
    assert set(rm.merged_state_dict(0.6)) == bare_keys


def test_lambda_api_unchanged_through_module_call():
    rm, _ = attached(lam=0.6)
    x = ids()
    with torch.no_grad():
        a = rm(x).logits
        b = rm.forward(x).logits
        c = rm(x, rain_lambda=0.0).logits
        with rm.lambda_scope(0.0):
            d = rm(x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    assert float((a - c).abs().max()) > 1e-3
    assert rm.get_lambda().tolist() == pytest.approx([0.6])
    bare = rm.detach()
    assert not isinstance(bare, RainModel) and not any(isinstance(m, RainLinear) for m in bare.modules())


def test_torch_compile_of_the_rain_model_follows_lambda():
    rm, _ = attached(lam=0.6)
    x = ids()
    with torch.no_grad():
        want = {lam: rm(x, rain_lambda=lam).logits for lam in (0.6, 0.0, 1.2)}
        compiled = torch.compile(rm, backend="aot_eager")
        for lam in (0.6, 0.0, 1.2):
            rm.set_lambda(lam)
            got = compiled(x).logits
            torch.testing.assert_close(got, want[lam], rtol=1e-5, atol=1e-5, msg=f"λ = {lam}")
