"""The decode fast path of RainLinear (issue 14): λ cached per change, the uniform-λ ``addmm_`` path,
and the grouped shrink of q/k/v and gate/up (one x A_catᵀ per group and forward).

References are float64 (weights rewritten W + λD in float64); every comparison fails on NaN
(finite checks, ``torch.equal``, bit views).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rain_adapter.runtime.layers as layers
from rain_adapter import RainAdapter, RainConfig
from rain_adapter.format.arch import ROLES
from rain_kernels import rain_linear, rain_linear_torch_fast
from rain_adapter.testing.tiny import random_deltas, tiny_model

ARCHS = ["qwen2", "llama"]


def make_adapter(model, *, rank=8, seed=0, bias=False, scale=0.3):
    deltas = random_deltas(model, rank=rank, seed=seed, bias=bias, scale=scale)
    cfg = RainConfig(base_model_name_or_path="tiny", target_modules=list(ROLES),
                     layers=list(range(model.config.num_hidden_layers)),
                     storage="lowrank" if rank else "dense", rank=rank)
    return cfg, deltas


def reference(model, deltas, lam: float, x: torch.Tensor) -> torch.Tensor:
    """float64 logits of the bare ``model`` (a copy taken before attaching) with every target weight
    rewritten W + λD (and b + λ d_b)."""
    m = copy.deepcopy(model).double()
    mods = dict(m.named_modules())
    with torch.no_grad():
        for name, d in deltas.items():
            lin = mods[name]
            lin.weight.add_(lam * d.dense(torch.float64))
            if d.bias is not None:
                lin.bias.add_(lam * d.bias.double())
        return m(x).logits


def ids(batch=2, t=7, seed=1, vocab=128):
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a.double() - b.double()).norm() / b.double().norm())


def ungroup(rm) -> None:
    for layer in rm.rain_layers.values():
        layer.group = None


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def count_shrinks(monkeypatch) -> list:
    calls = []
    real = layers.lowrank_shrink
    monkeypatch.setattr(layers, "lowrank_shrink", lambda x2d, a: calls.append(a.shape[0]) or real(x2d, a))
    return calls


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_shrink_equals_per_module_path_and_float64(arch, dtype, monkeypatch):
    model = tiny_model(arch, seed=31, dtype=dtype)
    cfg, deltas = make_adapter(model, seed=32, bias=(arch == "qwen2"))
    x = ids(batch=3, seed=33)
    ref = reference(model, deltas, 0.75, x)  # dyadic: λ is held in float32  # dyadic: λ is held in float32
    plain = copy.deepcopy(model)
    rm = RainAdapter.attach(model, (cfg, deltas), lam=0.75, check_fingerprint=False)
    rp = RainAdapter.attach(plain, (cfg, deltas), lam=0.75, check_fingerprint=False)
    ungroup(rp)
    calls = count_shrinks(monkeypatch)
    with torch.no_grad():
        grouped = rm(x).logits
        n_grouped = len(calls)
        single = rp(x).logits
    n_layers = model.config.num_hidden_layers
    # one shrink for q/k/v (3r rows), one for gate/up (2r), o and down alone: 4 per layer, not 7
    assert n_grouped == 4 * n_layers and len(calls) - n_grouped == 7 * n_layers
    assert sorted(set(calls[:n_grouped])) == [8, 16, 24]
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel_err(grouped, single) <= tol
    assert rel_err(grouped, ref) <= (1e-12 if dtype == torch.float64 else 1e-5)
    with torch.no_grad(), rm.lambda_scope(0.0):
        assert rel_err(rm(x).logits, ref) > 1e-3  # the delta matters: the test could fail


@pytest.mark.parametrize("arch", ARCHS)
def test_lambda_zero_bit_exact_with_grouping(arch):
    model = tiny_model(arch, seed=41)
    x = ids(batch=2, seed=42)
    with torch.no_grad():
        bare = model(x).logits.clone()
    cfg, deltas = make_adapter(model, seed=43, bias=(arch == "qwen2"))
    rm = RainAdapter.attach(model, (cfg, deltas), lam=0.0, check_fingerprint=False)
    assert any(layer.group is not None for layer in rm.rain_layers.values())
    with torch.no_grad():
        assert torch.equal(bits(rm(x).logits), bits(bare))
        rm.set_lambda([0.0, 0.9])
        mixed = rm(x).logits
    assert torch.equal(bits(mixed[0]), bits(bare[0]))
    assert rel_err(mixed[1], bare[1]) > 1e-3
    # a λ = 0 row stays the base even if a grouped member's factor holds NaN (the other row may not)
    layer = rm.rain_layers["model.layers.0.mlp.up_proj"]
    assert layer.group is not None
    layer.lora_B.fill_(float("nan"))
    with torch.no_grad():
        poisoned = rm(x).logits
    assert torch.equal(bits(poisoned[0]), bits(bare[0]))
    assert torch.isnan(poisoned[1]).any()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixed_lambda_in_one_batch_equals_separate_runs(arch, dtype):
    model = tiny_model(arch, seed=51, dtype=dtype)
    bare = copy.deepcopy(model)
    cfg, deltas = make_adapter(model, seed=52, bias=(arch == "qwen2"))
    rm = RainAdapter.attach(model, (cfg, deltas), check_fingerprint=False)
    lams = [0.0, 0.25, 1.0, 1.75]  # dyadic: λ is held in float32
    x = ids(batch=4, seed=53)
    with torch.no_grad():
        batched = rm(x, rain_lambda=lams).logits
        for i, lam in enumerate(lams):
            single = rm(x[i:i + 1], rain_lambda=lam).logits[0]
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            assert rel_err(batched[i], single) <= tol, f"row {i} λ={lam}"
            ref = reference(bare, deltas, lam, x[i:i + 1])[0]
            assert rel_err(batched[i], ref) <= (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("rank", [8, None])
def test_uniform_per_row_and_per_token_lambda_give_the_same_bits(rank):
    """A row's λ goes through the same arithmetic whether it came as one float, in a per-row list or
    per token, so continuous batching reproduces a uniform run bit for bit (same batch shape)."""
    model = tiny_model("qwen2", seed=65)
    with torch.no_grad():
        x = ids(batch=3, seed=66)
        bare = model(x, use_cache=False).logits.clone()
    rm = RainAdapter.attach(model, make_adapter(model, rank=rank, seed=67, bias=True), lam=0.75,
                            check_fingerprint=False)
    with torch.no_grad():
        uni = rm(x, use_cache=False).logits
        rm.set_lambda([0.75, 0.75, 0.75])
        assert torch.equal(bits(rm(x, use_cache=False).logits), bits(uni))
        rm.set_lambda([0.75, 0.0, 0.75])  # a λ = 0 row: the where path
        mixed = rm(x, use_cache=False).logits
        assert torch.equal(bits(mixed[[0, 2]]), bits(uni[[0, 2]]))
        assert torch.equal(bits(mixed[1]), bits(bare[1]))
        packed = x.reshape(1, -1)
        rm.set_lambda(0.75)
        uni_packed = rm(packed, use_cache=False).logits
        rm.set_token_lambda(torch.full((packed.shape[1],), 0.75))
        assert torch.equal(bits(rm(packed, use_cache=False).logits), bits(uni_packed))
    assert rel_err(uni, bare) > 1e-3


def test_changing_lambda_between_forwards_takes_effect():
    model = tiny_model("qwen2", seed=61)
    bare = copy.deepcopy(model)
    cfg, deltas = make_adapter(model, seed=62)
    x = ids(batch=2, seed=63)
    rm = RainAdapter.attach(model, (cfg, deltas), lam=0.5, check_fingerprint=False)
    # uniform -> uniform (in place), per row -> per row of the same shape (in place), and back
    for lam in (0.5, 1.2, [0.3, 1.1], [1.1, 0.3], [0.0, 0.6], 0.7, 0.0, 0.9):
        rm.set_lambda(lam)
        with torch.no_grad():
            out = rm(x).logits
        lams = lam if isinstance(lam, list) else [lam, lam]
        for i, li in enumerate(lams):
            assert rel_err(out[i], reference(bare, deltas, li, x[i:i + 1])[0]) <= 1e-5, (lam, i)
    # per-token λ after per-row λ of the same length: the cached per-row scale is not reused
    packed = x.reshape(1, -1)
    tok = torch.linspace(0.0, 1.5, packed.shape[1])
    rm.set_token_lambda(tok)
    with torch.no_grad():
        per_tok = rm(packed, use_cache=False).logits
        rm.set_lambda(float(tok[0]))
        first = rm(packed[:, :1], use_cache=False).logits
    assert rel_err(per_tok[0, 0], first[0, 0]) <= 1e-5


def _member(rm, suffix: str):
    return rm.rain_layers[f"model.layers.0.{suffix}"]


def _alone(layer, x):
    """The layer's output computed without its group (the per-module shrink)."""
    g, layer.group = layer.group, None
    try:
        return layer(x)
    finally:
        layer.group = g


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding (the stacked shrink GEMM may round differently from a lone one);
    a stale entry would be off by O(1)."""
    return rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_grouped_cache_never_serves_a_different_input(mode):
    model = tiny_model("qwen2", seed=71)
    rm = RainAdapter.attach(model, make_adapter(model, seed=72), lam=[0.4, 1.3], check_fingerprint=False)
    q, k, v = (_member(rm, f"self_attn.{p}_proj") for p in "qkv")
    assert q.group is k.group is v.group is not None
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    g = torch.Generator().manual_seed(73)
    with ctx:
        x1, x2 = (torch.randn(2, 5, 64, generator=g) for _ in range(2))
        assert not same(_alone(k, x1), _alone(k, x2))  # a stale entry would show
        q(x1)  # q caches x1's shrink for k and v
        assert same(k(x2), _alone(k, x2))  # same shape, another tensor
        assert same(v(x1), _alone(v, x1))
        assert same(q(x1), _alone(q, x1))
        y = x1[:, :4]
        assert same(k(y), _alone(k, y))  # a view of x1 of another shape
        # a member called twice recomputes (each member takes an entry at most once)
        q(x2)
        assert same(q(x2), _alone(q, x2))
        x3 = x2.clone()
        assert same(k(x3), _alone(k, x3))  # equal values, another object: recomputed, right anyway
        if mode == "no_grad":  # inference tensors track no version: documented in ShrinkGroup
            q(x1)
            x1.mul_(-2.0)  # in place: the version changes, the entry must not be served
            assert same(k(x1), _alone(k, x1))
            q(x1)
            x1.copy_(x2)
            assert same(v(x1), _alone(v, x2))
        # everyone served: the group holds no input
        q(x2), k(x2), v(x2)
        assert q.group._x is None and q.group._t is None


def test_fast_path_matches_float64_reference():
    g = torch.Generator().manual_seed(81)
    M, N, K, R = 5, 23, 19, 6
    x, W, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    A, B, D = torch.randn(R, K, generator=g), torch.randn(N, R, generator=g), torch.randn(N, K, generator=g)
    bd = torch.randn(N, generator=g)
    lam = torch.tensor([0.0, 0.5, -1.25, 2.0, 0.75])
    d64 = lambda t: t.double()  # noqa: E731
    for dense in (False, True):
        delta64 = d64(D) if dense else d64(B) @ d64(A)
        for uniform in (True, False):
            s = torch.full((M,), 0.6) if uniform else lam
            ref = d64(x) @ d64(W).T + d64(b) + d64(s)[:, None] * (d64(x) @ delta64.T + d64(bd))
            col = s[:, None]
            kw = dict(lam=0.6) if uniform else dict(lam=col, keep=col != 0)
            kw.update(delta=D) if dense else kw.update(shrunk=x @ A.T, lora_B=B)
            y = rain_linear_torch_fast(x, W, b, bias_delta=bd, **kw)
            assert rel_err(y, ref) <= 1e-5, (dense, uniform)
            general = rain_linear(x, W, b, s, delta=D if dense else None, lora_A=None if dense else A,
                                  lora_B=None if dense else B, bias_delta=bd)
            assert rel_err(y, general) <= 1e-5
            if not uniform:
                assert torch.equal(bits(y[0]), bits(torch.nn.functional.linear(x, W, b)[0]))


def test_shrunk_argument_of_the_general_path():
    g = torch.Generator().manual_seed(91)
    x, W = torch.randn(4, 12, generator=g).bfloat16(), torch.randn(9, 12, generator=g).bfloat16()
    A1, A2 = torch.randn(3, 12, generator=g).bfloat16(), torch.randn(5, 12, generator=g).bfloat16()
    B = torch.randn(9, 5, generator=g).bfloat16()
    s = torch.tensor([0.0, 1.0, 0.5, -0.5])
    t_all = torch.nn.functional.linear(x, torch.cat([A1, A2]))
    y = rain_linear(x, W, None, s, lora_A=A2, lora_B=B, shrunk=t_all[:, 3:])
    ref = rain_linear(x, W, None, s, lora_A=A2, lora_B=B)
    assert torch.isfinite(y).all() and torch.equal(y, ref)
    with pytest.raises(ValueError, match="shrunk"):
        rain_linear(x, W, None, s, lora_A=A2, lora_B=B, shrunk=t_all)


_WORKER = """
import torch
from rain_kernels import ops
g = torch.Generator().manual_seed(5)
M, N, K = 3, 21, 40
x, W, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
A = torch.randn(4 + 6, K, generator=g)
B = torch.randn(N, 6, generator=g)
s = torch.tensor([0.0, 0.7, -1.5])
t_all = x @ A.T
y = ops.launch_lowrank(x, W, b, s, A[4:], B, None, shrunk=t_all[:, 4:])
d = lambda t: t.double()
ref = d(x) @ d(W).T + d(b) + d(s)[:, None] * ((d(x) @ d(A[4:]).T) @ d(B).T)
err = float((y.double() - ref).norm() / ref.norm())
# the λ = 0 row is the kernel's base GEMM untouched: the same bits as the kernel's own-shrink run
own = ops.launch_lowrank(x, W, b, s, A[4:], B, None, variant="split")
exact0 = bool(torch.equal(y[0], own[0])) and float((y - own).abs().max()) < 1e-4
print("RESULT", err, exact0, bool(torch.isfinite(y).all()))
"""


def test_triton_interpreter_reads_a_grouped_shrink_slice():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", RAIN_KERNEL_POISON="1")
    proc = subprocess.run([sys.executable, "-c", _WORKER], env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(Path(__file__).resolve().parent.parent))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, proc.stderr[-2000:]
    _, err, exact0, finite = line[0].split()
    assert finite == "True" and float(err) <= 1e-5 and exact0 == "True", line[0]
