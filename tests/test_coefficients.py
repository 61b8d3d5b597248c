"""Stage 2 coefficients: α formula, folding rules, the passes end to end (rain_adapter.merging.coefficients)."""

from __future__ import annotations

import copy

import pytest
import torch

from rain_adapter.merging import coefficients as coef
from rain_adapter.format.arch import attention_geometry, module_layer, module_role
from rain_adapter.merging.attention import attention_pair_stats
from rain_adapter.merging.coefficients import (
    Stage2Error, alpha_from_stats, fold_alpha, fold_alpha_all, format_alpha_table, run_stage2,
)
from rain_adapter.format.delta import ModuleDelta
from rain_adapter.testing.fixtures import make_instruction_records, make_tokenizer
from rain_adapter.merging.spans import prepare_instruction_samples
from rain_adapter.testing.tiny import random_deltas, tiny_model


# ----------------------------------------------------------------------------------------------
# α formula
# ----------------------------------------------------------------------------------------------
def test_alpha_formula_hand_computed():
    a1 = torch.tensor([[0.4, 0.2, 0.1, 0.3]])
    u1 = torch.tensor([[0.2, 0.0, 0.5, 1.0]])
    # g = a - 0.5 u = [0.3, 0.2, -0.15, -0.2]; H = 1 + u = [1.2, 1, 1.5, 2]; raw = [0.25, 0.2, -0.1, -0.1]
    # raw / mean(raw) = [4, 3.2, -1.6, -1.6]; clipping the negatives to 0 leaves mean 1.8, so the
    # scale c solves c·(4 + 3.2)/4 = 1 → c = 5/9: α = [20/9, 16/9, 0, 0]; effective normaliser m/c
    alpha, raw, m = alpha_from_stats(a1, u1, rho=0.5, alpha_max=5.0)
    torch.testing.assert_close(raw, torch.tensor([[0.25, 0.2, -0.1, -0.1]]))
    assert m == pytest.approx(0.0625 * 9 / 5)
    torch.testing.assert_close(alpha, torch.tensor([[20 / 9, 16 / 9, 0.0, 0.0]]))
    alpha, _, _ = alpha_from_stats(a1, u1, rho=0.5, alpha_max=2.0)          # mean 1 only with both at α_max
    torch.testing.assert_close(alpha, torch.tensor([[2.0, 2.0, 0.0, 0.0]]))
    with pytest.raises(Stage2Error, match=r"2 of 4 heads have α_raw > 0.*needs α_max ≥ 2"):
        alpha_from_stats(a1, u1, rho=0.5, alpha_max=1.5)                    # 2·1.5/4 < 1: unreachable
    alpha, _, m = alpha_from_stats(a1, u1, rho=0.5, alpha_norm="none", alpha_max=0.9)   # paper's raw scale
    assert m == 1.0
    torch.testing.assert_close(alpha, torch.tensor([[0.25, 0.2, 0.0, 0.0]]))
    # gain: g = (a1 - a0) - rho (u1 - u0); H = 1 + u1
    a0 = torch.tensor([[0.1, 0.1, 0.1, 0.1]])
    u0 = torch.tensor([[0.2, 0.0, 0.1, 0.2]])
    # g = [0.3, 0.1, -0.2, -0.2]; raw = [0.25, 0.1, -0.1333, -0.1]; after clipping only 0.25 and 0.1
    # remain: c·(0.25 + 0.1)/(4 m0) = 1 → α = raw · 4/0.35 on the positive heads (max 2.857 < 10)
    alpha, raw, m = alpha_from_stats(a1, u1, rho=0.5, alpha_grad="gain", a0=a0, u0=u0, alpha_max=10.0)
    torch.testing.assert_close(raw, torch.tensor([[0.25, 0.1, -0.2 / 1.5, -0.1]]))
    assert m == pytest.approx(0.35 / 4)
    torch.testing.assert_close(alpha, torch.tensor([[0.25 * 4 / 0.35, 0.1 * 4 / 0.35, 0.0, 0.0]]))


def test_alpha_formula_errors():
    z = torch.zeros(2, 4)
    with pytest.raises(Stage2Error, match="all alignment statistics a are zero"):
        alpha_from_stats(z, z)
    with pytest.raises(Stage2Error, match="NaN"):
        alpha_from_stats(torch.full((2, 4), float("nan")), z)
    with pytest.raises(Stage2Error, match="cannot normalise"):
        alpha_from_stats(torch.full((1, 4), 0.1), torch.full((1, 4), 0.5), rho=1.0)
    with pytest.raises(Stage2Error, match="needs the λ = 0"):
        alpha_from_stats(torch.ones(1, 4), z[:1], alpha_grad="gain")
    with pytest.raises(Stage2Error, match="alpha_grad"):
        alpha_from_stats(torch.ones(1, 4), z[:1], alpha_grad="slope")
    with pytest.raises(Stage2Error, match="alpha_norm"):
        alpha_from_stats(torch.ones(1, 4), z[:1], alpha_norm="max")


def _bisect_mean_one(alpha0: torch.Tensor, alpha_max: float) -> float:
    """Reference scale: bisection in float64 on c ↦ mean(clip(c·α₀, 0, α_max)) = 1 (to 1e-15 relative)."""
    a = alpha0.double()

    def f(c: float) -> float:
        return float((c * a).clamp(0.0, alpha_max).mean())

    lo, hi = 0.0, 1.0
    while f(hi) < 1.0:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < 1.0 else (lo, mid)
    return hi


def _stats_with_clipping(seed: int, L: int = 6, H: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Skewed statistics: a few heads far above the mean (clipped at α_max), some below 0."""
    g = torch.Generator().manual_seed(seed)
    a1 = torch.rand(L, H, generator=g, dtype=torch.float64) ** 4 * 0.2 + 1e-3
    u1 = torch.rand(L, H, generator=g, dtype=torch.float64) * 0.003      # a few α_raw < 0
    return a1, u1


@pytest.mark.parametrize("seed", [101, 202, 303])
@pytest.mark.parametrize("alpha_max", [1.5, 3.0])
def test_mean_alpha_is_one_after_clipping(seed, alpha_max):
    from rain_adapter.merging.alpha import alpha_with_stats

    a1, u1 = _stats_with_clipping(seed)
    r = alpha_with_stats(a1, u1, rho=0.5, alpha_max=alpha_max)
    alpha = r.alpha.double()
    assert bool(torch.isfinite(alpha).all()) and all(v == v for v in r.stats.values())   # no NaN
    raw64 = (a1 - 0.5 * u1) / (1 + u1)
    alpha0 = raw64 / raw64.mean()
    assert float((alpha0 > alpha_max).sum()) > 0                  # the case exercises clipping at the top
    old_mean = float(alpha0.clamp(0, alpha_max).mean())
    assert old_mean < 1 - 1e-3                                     # clipping alone leaves the mean below 1
    assert abs(float(alpha.mean()) - 1.0) < 1e-6
    assert float(alpha.max()) <= alpha_max and float(alpha.min()) >= 0.0
    # against an independent float64 bisection
    c_ref = _bisect_mean_one(alpha0, alpha_max)
    assert r.stats["scale"] == pytest.approx(c_ref, rel=1e-12)
    torch.testing.assert_close(alpha, (c_ref * alpha0).clamp(0, alpha_max), rtol=1e-6, atol=1e-7)
    assert r.normaliser == pytest.approx(float(raw64.mean()) / c_ref, rel=1e-9)
    # recorded spread
    st = r.stats
    assert st["n"] == alpha.numel() and st["mean"] == pytest.approx(1.0, abs=1e-6)
    assert st["max"] == pytest.approx(alpha_max) and st["min"] == 0.0
    assert st["std"] == pytest.approx(float(alpha.std(unbiased=False)), rel=1e-9)
    pre = c_ref * alpha0
    assert 0 < st["frac_at_max"] == pytest.approx(float((pre >= alpha_max).double().mean()))
    assert st["frac_at_zero"] == pytest.approx(float((pre <= 0).double().mean()))
    assert st["frac_at_max"] == pytest.approx(float((alpha >= torch.tensor(alpha_max).float()).double().mean()))
    assert st["mean_clip_only"] == pytest.approx(old_mean, rel=1e-9)


@pytest.mark.parametrize("seed", [7, 8])
def test_renormalised_alpha_keeps_the_order_of_heads(seed):
    a1, u1 = _stats_with_clipping(seed, L=4, H=16)
    alpha, raw, _ = alpha_from_stats(a1, u1, rho=0.5, alpha_max=1.5)
    order = torch.argsort(raw.double().flatten(), stable=True)
    a_sorted = alpha.double().flatten()[order]
    assert bool((a_sorted[1:] >= a_sorted[:-1]).all())                    # monotone in α_raw
    strict = (alpha.flatten()[order][1:] > 0) & (alpha.flatten()[order][1:] < 1.5)
    raw_sorted = raw.double().flatten()[order]
    # inside (0, α_max) the order is strict wherever α_raw differs
    assert bool((a_sorted[1:][strict & (raw_sorted[1:] > raw_sorted[:-1])]
                 > a_sorted[:-1][strict & (raw_sorted[1:] > raw_sorted[:-1])]).all())


def test_no_clipping_gives_the_old_alpha_bit_for_bit():
    from rain_adapter.merging.alpha import alpha_with_stats

    g = torch.Generator().manual_seed(4242)
    a1 = 0.05 + 0.01 * torch.rand(3, 8, generator=g)          # float32 statistics, as collected
    u1 = 0.01 * torch.rand(3, 8, generator=g)
    r = alpha_with_stats(a1, u1, rho=0.5, alpha_max=1.5)
    # the formula before the renormalisation existed, verbatim
    raw = (a1.double() - 0.5 * u1.double()) / (1.0 + u1.double())
    m = float(raw.mean())
    old = (raw / m).clamp(0.0, 1.5).float()
    assert float((raw / m).min()) > 0 and float((raw / m).max()) < 1.5      # nothing clipped
    assert torch.equal(r.alpha, old) and r.normaliser == m and r.stats["scale"] == 1.0
    assert r.stats["frac_at_max"] == 0.0 and r.stats["frac_at_zero"] == 0.0
    # alpha_norm="none" is unchanged by the renormalisation (clipping only)
    alpha, _, n = alpha_from_stats(a1, u1, rho=0.5, alpha_norm="none", alpha_max=0.051)
    assert n == 1.0 and torch.equal(alpha, raw.clamp(0.0, 0.051).float())


def test_mean_one_scale_exact_cases_and_impossible():
    from rain_adapter.merging.alpha import mean_one_scale

    assert mean_one_scale(torch.tensor([3.0, 1.0]), 1.5) == 0.5          # 1.5 + c = 2
    assert mean_one_scale(torch.tensor([3.0, 1.0, 0.5]), 1.5) == 1.0     # 1.5 + c·1.5 = 3
    assert mean_one_scale(torch.tensor([1.0, 1.0, -2.0, 0.0]), 2.0) == 2.0   # both positives at α_max
    with pytest.raises(Stage2Error, match="largest reachable mean"):
        mean_one_scale(torch.tensor([2.0, 1.0, 0.5]), 0.9)                 # α_max < 1: never
    with pytest.raises(Stage2Error, match="0 of 3 heads"):
        mean_one_scale(torch.tensor([0.0, -1.0, 0.0]), 5.0)                # nothing positive
    a1, u1 = _stats_with_clipping(5)
    with pytest.raises(Stage2Error, match="cannot renormalise"):
        alpha_from_stats(a1, u1, alpha_max=0.99)


def test_format_alpha_table_shows_the_spread():
    a1, u1 = _stats_with_clipping(11, L=2, H=4)
    from rain_adapter.merging.alpha import alpha_with_stats

    r = alpha_with_stats(a1, u1, alpha_max=2.0)
    summary = {"method": "instruction-attention", "alpha_max": 2.0, "alpha_stats": r.stats,
               "alpha": {str(i): [round(float(x), 6) for x in r.alpha[i]] for i in range(2)}}
    text = format_alpha_table(summary)
    assert "α over 8 heads: mean 1.0000" in text and "scale c" in text and "at α_max=2" in text
    old = {k: v for k, v in summary.items() if k != "alpha_stats"}       # an adapter from before
    text = format_alpha_table(old)
    assert "α over 8 heads" in text and "renormalisation after clipping not recorded" in text


# ----------------------------------------------------------------------------------------------
# folding
# ----------------------------------------------------------------------------------------------
def _explicit(name: str, D: torch.Tensor, b: torch.Tensor | None, alpha: torch.Tensor, H: int, KV: int, hD: int,
              o_alpha: str = "mean"):
    """Per-head scaling written head by head (the folding rules of DESIGN §6.3)."""
    role = module_role(name)
    D = D.double().clone()
    b = None if b is None else b.double().clone()
    a = alpha.double()
    if role == "q":
        for h in range(H):
            D[h * hD:(h + 1) * hD] *= a[h]
            if b is not None:
                b[h * hD:(h + 1) * hD] *= a[h]
    elif role in ("k", "v"):
        n_rep = H // KV
        for j in range(KV):
            kv_alpha = torch.stack([a[h] for h in range(H) if h // n_rep == j]).mean()
            D[j * hD:(j + 1) * hD] *= kv_alpha
            if b is not None:
                b[j * hD:(j + 1) * hD] *= kv_alpha
    elif role == "o" and o_alpha == "head":
        for h in range(H):
            D[:, h * hD:(h + 1) * hD] *= a[h]
        if b is not None:
            b *= a.mean()
    else:
        D *= a.mean()
        if b is not None:
            b *= a.mean()
    return D, b


@pytest.mark.parametrize("role", ["q", "k", "v", "o", "gate", "up", "down"])
def test_default_folding_keeps_the_stage1_constraint(role):
    """Row scaling keeps D X = 0 at the protected inputs; o's per-head column scaling would not."""
    from rain_adapter.format.arch import target_names
    from rain_adapter.testing.tiny import tiny_config

    g = torch.Generator().manual_seed(11)
    cfg = tiny_config("qwen2")
    H, KV, hD = attention_geometry(cfg)
    name = next(n for n in target_names(cfg, [role], [0]))
    out_dim = {"q": H * hD, "k": KV * hD, "v": KV * hD, "o": 64, "gate": 128, "up": 128, "down": 64}[role]
    in_dim = {"o": H * hD, "down": 128}.get(role, 64)
    X = torch.randn(in_dim, 10, generator=g, dtype=torch.float64)        # protected inputs [in, n]
    U, _, _ = torch.linalg.svd(X, full_matrices=False)
    D = torch.randn(out_dim, in_dim, generator=g, dtype=torch.float64)
    D = D - (D @ U) @ U.T                                                 # Stage 1: D X = 0
    alpha = torch.tensor([0.2, 1.5, 0.7, 1.1], dtype=torch.float64)
    folded = fold_alpha(name, ModuleDelta(delta=D), alpha, H, KV, hD)
    # fold_alpha computes in float32: the residual is float32 round-off, not a violation
    assert float((folded.delta @ X).norm() / (D.norm() * X.norm())) < 1e-6
    if role == "o":
        broken = fold_alpha(name, ModuleDelta(delta=D), alpha, H, KV, hD, o_alpha="head")
        assert float((broken.delta @ X).norm() / (D.norm() * X.norm())) > 1e-3


def test_kv_alpha_is_mean_of_sharing_q_heads():
    hD, H, KV = 2, 4, 2
    md = ModuleDelta(delta=torch.ones(KV * hD, 3))
    out = fold_alpha("model.layers.0.self_attn.k_proj", md, torch.tensor([1.0, 2.0, 3.0, 4.0]), H, KV, hD)
    torch.testing.assert_close(out.delta[:, 0], torch.tensor([1.5, 1.5, 3.5, 3.5]))   # kv = h // n_rep
    out = fold_alpha("model.layers.0.mlp.up_proj", ModuleDelta(delta=torch.ones(2, 2)),
                     torch.tensor([1.0, 2.0, 3.0, 4.0]), H, KV, hD)
    torch.testing.assert_close(out.delta, torch.full((2, 2), 2.5))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("o_alpha", ["mean", "head"])
def test_folding_matches_explicit_per_head_scaling(arch, o_alpha):
    from rain_adapter.format.config import RainConfig
    from rain_adapter.runtime.model import RainAdapter

    model = tiny_model(arch, seed=2)
    H, KV, hD = attention_geometry(model.config)
    L = model.config.num_hidden_layers
    alpha = 0.2 + 1.3 * torch.rand(L, H, generator=torch.Generator().manual_seed(4))
    dense = random_deltas(model, seed=1, bias=True, scale=0.2)
    low = random_deltas(model, seed=2, rank=3, bias=True, scale=0.2)

    f_dense = fold_alpha_all(dense, alpha, H, KV, hD, o_alpha=o_alpha)
    f_low = fold_alpha_all(low, alpha, H, KV, hD, o_alpha=o_alpha)
    explicit = {}
    for name in dense:
        a = alpha[module_layer(name)]
        D, b = _explicit(name, dense[name].delta, dense[name].bias, a, H, KV, hD, o_alpha)
        torch.testing.assert_close(f_dense[name].delta.double(), D)
        if b is not None:
            torch.testing.assert_close(f_dense[name].bias.double(), b)
        explicit[name] = (D, b)
        # low-rank: B rows (q/k/v/mlp) or A columns (o) scaled == the same per-head scaling of B A
        assert f_low[name].is_lowrank and f_low[name].rank == 3
        D_low, _ = _explicit(name, low[name].dense(), None, a, H, KV, hD, o_alpha)
        torch.testing.assert_close(f_low[name].dense(torch.float64), D_low)

    # in a forward pass: attaching the folded deltas at λ = 1 == the merged per-head-scaled weights
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    merged = copy.deepcopy(model).double()
    mods = dict(merged.named_modules())
    with torch.no_grad():
        for name, (D, b) in explicit.items():
            mods[name].weight += D
            if b is not None:
                mods[name].bias += b
        ref = merged(ids, use_cache=False).logits
        cfg = RainConfig(target_modules=sorted({module_role(n) for n in f_dense}), layers=list(range(L)))
        rain = RainAdapter.attach(model, (cfg, f_dense), lam=1.0, check_fingerprint=False)
        try:
            got = rain(ids, use_cache=False).logits
        finally:
            rain.detach()
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_fold_shape_mismatch_is_clear():
    with pytest.raises(Stage2Error, match="q_proj: out dim 10"):
        fold_alpha("model.layers.0.self_attn.q_proj", ModuleDelta(delta=torch.ones(10, 4)), torch.ones(4), 4, 2, 2)


# ----------------------------------------------------------------------------------------------
# the passes end to end
# ----------------------------------------------------------------------------------------------
def _records():
    recs = make_instruction_records(["cats", "the sea", "mountains", "coffee", "trains"])
    recs.append({**recs[0], "id": 99, "response": "z" * 600 + recs[0]["response"]})   # too long
    return recs


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _model(arch="qwen2", seed=0):
    return tiny_model(arch, seed=seed, vocab_size=len(make_tokenizer()), max_position_embeddings=4096)


def test_run_stage2_level_matches_manual_and_leaves_model_untouched(tok):
    model = _model("qwen2")
    model.config._attn_implementation = "sdpa"
    deltas = random_deltas(model, seed=3, scale=0.3, bias=True)
    ids = torch.randint(0, 200, (1, 16))
    with torch.no_grad():
        before = model(ids).logits
    # ρ spelled out (the default is 0 since the Stage 2 trial): the hand computation below checks its term
    folded, summary = run_stage2(model, tok, deltas, _records(), max_seq_len=400, progress=False, rho=0.5)

    # model back as it was
    assert not any(type(m).__name__ == "RainLinear" for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)

    # summary
    H, KV, hD = attention_geometry(model.config)
    assert summary["alpha_grad"] == "level" and summary["alpha_norm"] == "mean" and summary["rho"] == 0.5
    assert summary["samples"]["records"] == 6 and summary["samples"]["skipped_too_long"] == 1
    assert summary["samples"]["samples_used"] == 5
    assert summary["pairs_a"] == 10 and summary["pairs_u"] == 10 and summary["frac_a_positive"] == 1.0
    assert summary["mean_a"] > 0 and summary["mean_u"] > 0
    alpha = torch.tensor([summary["alpha"][str(i)] for i in range(2)])
    assert alpha.shape == (2, H) and (alpha >= 0).all() and (alpha <= 1.5).all()
    assert "top heads" in format_alpha_table(summary)
    assert "not applied (--no-stage2" in format_alpha_table({"applied": False, "reason": "--no-stage2", "alpha": 1.0})

    # α by hand: merged weights (W + D, λ = 1) on a plain model, eager, stats per pair, E over pairs
    merged = copy.deepcopy(model)
    merged.config._attn_implementation = "eager"
    mods = dict(merged.named_modules())
    with torch.no_grad():
        for name, d in deltas.items():
            mods[name].weight += d.delta
            if d.bias is not None:
                mods[name].bias += d.bias
    samples, _ = prepare_instruction_samples(_records(), tok, max_seq_len=400)
    from rain_adapter.merging.attention import AttentionPair

    a_list, u_list = [], []
    for s in samples:
        pairs, kinds = [], []
        for g in s.groups:
            if g.related_tokens.numel():
                pairs.append(AttentionPair(g.related_tokens, g.prompt_tokens))
                kinds.append("a")
            if g.unrelated_tokens.numel():
                pairs.append(AttentionPair(g.unrelated_tokens, g.prompt_tokens))
                kinds.append("u")
        st = attention_pair_stats(merged, s.input_ids, pairs)
        a_list += [st[i] for i, k in enumerate(kinds) if k == "a"]
        u_list += [st[i] for i, k in enumerate(kinds) if k == "u"]
    a = torch.stack(a_list).double().mean(0)
    u = torch.stack(u_list).double().mean(0)
    assert summary["mean_a"] == pytest.approx(float(a.mean()), rel=1e-4)
    raw = (a - 0.5 * u) / (1 + u)
    alpha0 = raw / raw.mean()
    expect = (_bisect_mean_one(alpha0, 1.5) * alpha0).clamp(0, 1.5)
    torch.testing.assert_close(alpha.double(), expect, rtol=1e-4, atol=1e-5)
    st = summary["alpha_stats"]
    assert abs(float(alpha.double().mean()) - 1.0) < 1e-5 and st["mean"] == pytest.approx(1.0, abs=1e-6)
    assert st["max"] <= 1.5 and st["n"] == alpha.numel() and "α over" in format_alpha_table(summary)

    # the folded deltas are fold_alpha_all of the stored table
    ref = fold_alpha_all(deltas, alpha, H, KV, hD)
    assert set(folded) == set(deltas)
    for name in deltas:
        torch.testing.assert_close(folded[name].delta, ref[name].delta, rtol=1e-5, atol=1e-7)


def test_run_stage2_gain_lowrank_llama(tok):
    model = _model("llama", seed=1)
    deltas = random_deltas(model, targets=["q", "k", "v", "o", "down"], layers=[1], rank=4, seed=5, scale=0.5)
    folded, summary = run_stage2(model, tok, deltas, _records(), alpha_grad="gain", alpha_norm="none",
                                 rho=0.25, max_seq_len=400, max_samples=3, progress=False)
    assert summary["alpha_grad"] == "gain" and "mean_a0" in summary
    assert summary["samples"]["records"] == 3
    assert all(folded[n].is_lowrank and folded[n].rank == 4 for n in deltas)
    # deltas change attention: λ = 1 and λ = 0 statistics differ
    assert summary["mean_a"] != pytest.approx(summary["mean_a0"], rel=1e-6)


def test_run_stage2_all_zero_statistics_is_an_error(tok, monkeypatch):
    model = _model("qwen2")
    deltas = random_deltas(model, seed=0)

    def zeros(model, ids, pairs, **kw):
        return torch.zeros(len(pairs), model.config.num_hidden_layers, model.config.num_attention_heads)

    monkeypatch.setattr(coef, "attention_pair_stats", zeros)
    with pytest.raises(Stage2Error, match=r"a > 0 on only 0/\d+"):
        run_stage2(model, tok, deltas, _records(), max_seq_len=400, progress=False)
    assert not any(type(m).__name__ == "RainLinear" for m in model.modules())   # detached on error


def test_run_stage2_nothing_usable(tok):
    model = _model("qwen2")
    deltas = random_deltas(model, seed=0)
    from rain_adapter.merging.spans import SpanError

    with pytest.raises(SpanError, match="max_seq_len=50"):
        run_stage2(model, tok, deltas, _records(), max_seq_len=50, progress=False)
    recs = [{**r, "related_prompt_list": [{"prompt_spans": ["nope"], "response_spans": ["nada"]}],
             "unrelated_response_spans": []} for r in _records()]
    with pytest.raises(SpanError, match="none of the"):
        run_stage2(model, tok, deltas, recs, max_seq_len=400, progress=False)
    with pytest.raises(Stage2Error, match="alpha_grad"):
        run_stage2(model, tok, deltas, _records(), alpha_grad="nope", progress=False)
    with pytest.raises(Stage2Error, match="alpha_max = 0.8 < 1"):           # before any pass
        run_stage2(model, tok, deltas, _records(), alpha_max=0.8, progress=False)


def test_run_stage2_on_shared_set(tok):
    from rain_adapter.merging.spans import default_instruction_calib_path

    path = default_instruction_calib_path()  # packaged (tests/test_packaged_data.py)
    model = _model("qwen2")
    deltas = random_deltas(model, seed=0, scale=0.2)
    folded, summary = run_stage2(model, tok, deltas, path, max_samples=3, max_seq_len=4096, progress=False)
    assert summary["samples"]["samples_used"] >= 1 and summary["frac_a_positive"] >= 0.9
    assert set(folded) == set(deltas)
