"""Row-only attention statistics probe (rain_adapter.merging.attention) against full eager attentions."""

from __future__ import annotations

import pytest
import torch

from rain_adapter.merging.attention import (
    AttentionPair, attention_pair_stats, attention_probe, make_recorder,
)
from rain_adapter.testing.tiny import tiny_model


def _reference(model, ids, pairs) -> torch.Tensor:
    """float64 statistics from output_attentions=True under eager attention: [n_pairs, L, H]."""
    saved = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = model(ids, output_attentions=True, use_cache=False)
    finally:
        model.config._attn_implementation = saved
    L = len(out.attentions)
    H = out.attentions[0].shape[1]
    ref = torch.zeros(len(pairs), L, H, dtype=torch.float64)
    for l_idx, A in enumerate(out.attentions):
        A = A[0].double()                                   # [H, T, T]
        for p, pr in enumerate(pairs):
            q = torch.as_tensor(pr.queries).unique()
            k = torch.as_tensor(pr.keys).unique()
            ref[p, l_idx] = A[:, q][:, :, k].sum((1, 2)) / (q.numel() * k.numel())
    return ref


def _random_pairs(T: int, gen: torch.Generator, n: int = 4) -> list[AttentionPair]:
    pairs = []
    for _ in range(n):
        cut = int(torch.randint(4, T - 4, (1,), generator=gen))
        keys = torch.randperm(cut, generator=gen)[: max(1, cut // 3)]
        queries = cut + torch.randperm(T - cut, generator=gen)[: max(1, (T - cut) // 2)]
        pairs.append(AttentionPair(queries, keys))
    # a pair with queries before some keys (causally masked part must count as 0)
    pairs.append(AttentionPair(torch.arange(0, T, 3), torch.arange(1, T, 2)))
    return pairs


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("seed", [0, 1])
def test_row_stats_equal_output_attentions(arch, seed):
    model = tiny_model(arch, seed=seed)
    n_heads, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    assert n_heads // n_kv > 1                                 # GQA with n_rep > 1
    gen = torch.Generator().manual_seed(100 + seed)
    T = 57
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=gen)
    pairs = _random_pairs(T, gen)
    ref = _reference(model, ids, pairs)
    assert torch.isfinite(ref).all() and ref.abs().max() > 0

    for impl in ("eager", "sdpa"):
        model.config._attn_implementation = impl
        # chunk=5 forces several row chunks (the chunking must not change the sums)
        got = attention_pair_stats(model, ids, pairs, chunk=5)
        assert got.shape == (len(pairs), model.config.num_hidden_layers, n_heads)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
        assert model.config._attn_implementation == impl  # restored


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_probe_does_not_change_the_forward(impl):
    model = tiny_model("llama", seed=3)
    model.config._attn_implementation = impl
    ids = torch.randint(0, 128, (1, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        rec = make_recorder([AttentionPair([20, 30], [1, 2, 3])], 33)
        with attention_probe(model, rec):
            assert model.config._attn_implementation.startswith("rain_probe_")
            got = model(ids, use_cache=False).logits
    assert torch.equal(got, ref)
    assert sorted(rec.results) == [0, 1]
    assert model.config._attn_implementation == impl


def test_implementation_restored_on_error():
    model = tiny_model("qwen2", seed=0)
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 128, (1, 20))
    with pytest.raises(ValueError, match="out of range"):
        attention_pair_stats(model, ids, [AttentionPair([25], [0])])
    rec = make_recorder([AttentionPair([10], [0])], 20)
    with pytest.raises(ValueError, match="expected a full forward over 20 tokens"):
        with attention_probe(model, rec), torch.no_grad():
            model(ids[:, :15], use_cache=False)
    assert model.config._attn_implementation == "sdpa"
    # still usable afterwards
    assert torch.isfinite(attention_pair_stats(model, ids, [AttentionPair([10], [0])])).all()


def test_correct_direction_sees_leakage_reversed_sees_none():
    """Instruction tokens early (prompt), unrelated response tokens late.

    queries = response tokens, keys = instruction tokens (DESIGN §6.3): non-zero leakage u.
    The reference code's direction (queries = instruction tokens, keys = response tokens) reads
    only causally masked entries: exactly zero.  This must never come back.
    """
    model = tiny_model("qwen2", seed=5)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    instr = torch.arange(3, 9)
    unrelated = torch.arange(30, 38)
    st = attention_pair_stats(model, ids, [AttentionPair(unrelated, instr), AttentionPair(instr, unrelated)])
    assert (st[0] > 0).all()
    assert (st[1] == 0).all()


def test_empty_pair_rejected():
    with pytest.raises(ValueError, match="empty"):
        make_recorder([AttentionPair([], [1])], 10)


def test_sliding_window_layers():
    """Qwen2 with a sliding-window layer: the probe applies the same window as the model."""
    model = tiny_model("qwen2", seed=0, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert model.model.layers[1].self_attn.sliding_window == 8
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 128, (1, 40), generator=gen)
    pairs = _random_pairs(40, gen)
    ref = _reference(model, ids, pairs)
    for impl in ("eager", "sdpa"):
        model.config._attn_implementation = impl
        torch.testing.assert_close(attention_pair_stats(model, ids, pairs, chunk=7).double(), ref,
                                   rtol=1e-5, atol=1e-7)
