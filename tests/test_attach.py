"""RainAdapter.attach / RainLinear / λ API on tiny Qwen2 and Llama models (random weights)."""

from __future__ import annotations

import copy

import pytest
import torch

from rain_adapter import RainAdapter, RainConfig, RainLinear
from rain_adapter.format.arch import ROLES, target_names
from rain_adapter.format.fingerprint import compute_fingerprint
from rain_adapter.testing.tiny import random_deltas, tiny_model

ARCHS = ["qwen2", "llama"]


def make_adapter(model, *, rank=None, seed=0, bias=False, scale=0.2):
    deltas = random_deltas(model, rank=rank, seed=seed, bias=bias, scale=scale)
    cfg = RainConfig(
        base_model_name_or_path="tiny",
        target_modules=list(ROLES),
        layers=list(range(model.config.num_hidden_layers)),
        storage="lowrank" if rank else "dense",
        rank=rank,
        fingerprint=compute_fingerprint(model, deltas),
    )
    return cfg, deltas


def rewritten(model, deltas, lam):
    """A deep copy of ``model`` whose weights were rewritten W + λD (float64 math)."""
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for name, d in deltas.items():
            lin = mods[name]
            lin.weight.copy_((lin.weight.double() + lam * d.dense(torch.float64)).float())
            if d.bias is not None:
                b0 = lin.bias.double() if lin.bias is not None else 0
                if lin.bias is None:
                    lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features))
                lin.bias.copy_((b0 + lam * d.bias.double()).float())
    return m


def ids(batch=2, t=9, seed=1, vocab=128):
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ARCHS)
def test_lambda_zero_is_bit_for_bit_the_bare_model(arch):
    model = tiny_model(arch, seed=3)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits.clone()
    rm = RainAdapter.attach(model, make_adapter(model, seed=4), lam=0.0)
    with torch.no_grad():
        out = rm(x).logits
    assert torch.equal(out, ref)
    # per-row λ with a zero row: that row is also bit for bit the bare model's
    rm.set_lambda([0.0, 0.7])
    with torch.no_grad():
        mixed = rm(x).logits
    assert torch.equal(mixed[0], ref[0])
    assert not torch.allclose(mixed[1], ref[1])


def test_lambda_zero_shortcut_is_off_while_a_cuda_graph_captures(monkeypatch):
    """At λ = 0 RainLinear returns the bare layer without touching λ, except during CUDA-graph
    capture: there it goes through rain_linear (which reads λ from the device buffer), so a graph
    captured at λ = 0 applies a later set_lambda. Capture is simulated (no GPU here)."""
    import rain_adapter.runtime.layers as layers

    model = tiny_model("qwen2", seed=3)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits.clone()
    rm = RainAdapter.attach(model, make_adapter(model, seed=4), lam=0.0)
    calls = []
    real = layers.rain_linear
    monkeypatch.setattr(layers, "rain_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        rm(x)
    assert not calls  # the shortcut, outside capture
    monkeypatch.setattr(layers, "_capturing", lambda x: True)
    with torch.no_grad():
        out = rm(x).logits
    assert len(calls) == 7 * model.config.num_hidden_layers and torch.equal(out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rank", [None, 4])
def test_gpu_model_graph_captured_at_zero_follows_set_lambda(rank):
    """Capture the attached model's forward (use_cache off: HF's cache bookkeeping is not under
    test) while λ = 0, then replay after set_lambda: the replay follows λ."""
    model = tiny_model("qwen2", seed=3)
    adapter = make_adapter(model, rank=rank, seed=4)
    rm = RainAdapter.attach(model.cuda().to(torch.bfloat16), adapter, lam=0.0)
    x = ids().cuda()
    fwd = lambda: rm(x, use_cache=False).logits  # noqa: E731
    eager = {}
    with torch.no_grad():
        for lam in (0.7, 0.0):
            rm.set_lambda(lam)
            eager[lam] = fwd().float().clone()
        s = torch.cuda.Stream()  # warm up on a side stream (autotuning stays out of the capture)
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fwd()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):  # captured at λ = 0
            out = fwd()
        for lam in (0.7, 0.0):
            rm.set_lambda(lam)
            g.replay()
            torch.cuda.synchronize()
            assert rel_err(out.float(), eager[lam]) < 2e-2, lam
    assert rel_err(eager[0.7], eager[0.0]) > 0.05  # the two λ really differ


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rank", [None, 4])
@pytest.mark.parametrize("lam", [1.0, 0.37])
def test_lambda_equals_rewritten_weights(arch, rank, lam):
    model = tiny_model(arch, seed=5)
    cfg, deltas = make_adapter(model, rank=rank, seed=6, bias=True)
    ref_model = rewritten(model, deltas, lam)
    x = ids(seed=7)
    with torch.no_grad():
        ref = ref_model(x).logits
    rm = RainAdapter.attach(model, (cfg, deltas), lam=lam)
    assert all(isinstance(m, RainLinear) for m in rm.rain_layers.values())
    with torch.no_grad():
        out = rm(x).logits
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= 1e-5
    # and the adapter really changes the output (the test could fail)
    with torch.no_grad(), rm.lambda_scope(0.0):
        bare = rm(x).logits
    assert rel_err(bare, ref) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_per_row_lambda_equals_separate_runs(arch):
    model = tiny_model(arch, seed=8)
    rm = RainAdapter.attach(model, make_adapter(model, seed=9))
    lams = [0.0, 0.25, 1.0, 1.7]
    x = ids(batch=4, seed=10)
    rm.set_lambda(lams)
    with torch.no_grad():
        batched = rm(x).logits
    for i, lam in enumerate(lams):
        rm.set_lambda(lam)
        with torch.no_grad():
            single = rm(x[i : i + 1]).logits[0]
        assert torch.allclose(batched[i], single, rtol=1e-5, atol=1e-5), f"row {i} λ={lam}"


def test_greedy_generate_per_row_lambda_matches_separate_generates():
    model = tiny_model("qwen2", seed=11)
    rm = RainAdapter.attach(model, make_adapter(model, seed=12, scale=0.5))
    x = ids(batch=3, t=6, seed=13)
    lams = [0.0, 0.8, 1.5]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = rm.generate(input_ids=x, attention_mask=torch.ones_like(x), rain_lambda=lams, **kw)
        assert rm.get_lambda().tolist() == [1.0]  # restored after the call
        singles = [
            rm.generate(input_ids=x[i : i + 1], attention_mask=torch.ones_like(x[i : i + 1]), rain_lambda=lam, **kw)[0]
            for i, lam in enumerate(lams)
        ]
    for i in range(3):
        assert torch.equal(batched[i], singles[i]), f"row {i}"
    # λ matters for at least one row (otherwise the test proves nothing)
    with torch.no_grad():
        bare = rm.generate(input_ids=x, attention_mask=torch.ones_like(x), rain_lambda=0.0, **kw)
    assert not torch.equal(bare[2], batched[2])


def test_beams_and_num_return_sequences_broadcast_lambda():
    model = tiny_model("llama", seed=14)
    rm = RainAdapter.attach(model, make_adapter(model, seed=15, scale=0.5))
    x = ids(batch=2, t=5, seed=16)
    am = torch.ones_like(x)
    with torch.no_grad():
        out = rm.generate(input_ids=x, attention_mask=am, num_beams=3, num_return_sequences=2,
                          max_new_tokens=4, do_sample=False, pad_token_id=0, rain_lambda=[0.0, 1.0])
        assert out.shape[0] == 4
        ref0 = rm.generate(input_ids=x[:1], attention_mask=am[:1], num_beams=3, num_return_sequences=2,
                           max_new_tokens=4, do_sample=False, pad_token_id=0, rain_lambda=0.0)
        ref1 = rm.generate(input_ids=x[1:], attention_mask=am[1:], num_beams=3, num_return_sequences=2,
                           max_new_tokens=4, do_sample=False, pad_token_id=0, rain_lambda=1.0)
    assert torch.equal(out[:2], ref0)
    assert torch.equal(out[2:], ref1)


def test_lambda_scope_restores_and_set_lambda_validates():
    model = tiny_model("qwen2", seed=17)
    rm = RainAdapter.attach(model, make_adapter(model, seed=18), lam=0.5)
    with rm.lambda_scope(1.2):
        assert rm.get_lambda().tolist() == pytest.approx([1.2])
    assert rm.get_lambda().tolist() == [0.5]
    for bad in (float("nan"), float("inf"), [0.1, float("-inf")]):
        with pytest.raises(ValueError, match="finite"):
            rm.set_lambda(bad)
    with pytest.raises(ValueError):
        rm.set_lambda(torch.zeros(2, 2))
    assert rm.get_lambda().tolist() == [0.5]  # a refused λ changes nothing
    with pytest.warns(UserWarning, match="lambda_range"):
        rm.set_lambda(5.0)


def test_merge_and_detach():
    model = tiny_model("qwen2", seed=19)
    x = ids(seed=20)
    with torch.no_grad():
        bare = model(x).logits.clone()
    cfg, deltas = make_adapter(model, seed=21, bias=True)
    rm = RainAdapter.attach(model, (cfg, deltas), lam=0.6)
    with torch.no_grad():
        attached = rm(x).logits
    merged = rm.merged_state_dict(0.6)
    plain = tiny_model("qwen2", seed=999)
    plain.load_state_dict(merged)
    with torch.no_grad():
        assert rel_err(plain(x).logits, attached) <= 1e-5
    original = rm.detach()
    assert original is model
    assert not any(isinstance(m, RainLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x).logits, bare)
    with pytest.raises(RuntimeError, match="detached"):
        rm.set_lambda(1.0)


def test_rainmodel_behaves_like_the_model():
    model = tiny_model("qwen2", seed=22)
    rm = RainAdapter.attach(model, make_adapter(model, seed=23))
    assert rm.config is model.config
    assert rm.device == model.device
    assert rm.num_parameters() == model.num_parameters()
    assert "RainModel" in repr(rm)
    with pytest.raises(ValueError, match="already"):
        RainAdapter.attach(rm, make_adapter(model, seed=23))


def test_subset_of_modules_and_layers():
    model = tiny_model("llama", seed=24, num_hidden_layers=3)
    names = target_names(model.config, ["q", "down"], [1, 2])
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                     "model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj"]
    deltas = random_deltas(model, ["q", "down"], [1, 2])
    cfg = RainConfig(base_model_name_or_path="tiny", target_modules=["q", "down"], layers=[1, 2])
    rm = RainAdapter.attach(model, (cfg, deltas))
    assert sorted(rm.rain_layers) == sorted(names)
    with pytest.raises(ValueError, match="unknown target role"):
        target_names(model.config, ["qq"])
