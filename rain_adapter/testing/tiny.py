"""Tiny Qwen2 / Llama models built from a config, for tests, examples and benchmarks."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

_DEFAULTS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def tiny_config(arch: str = "qwen2", **overrides) -> PretrainedConfig:
    """A small config (hidden 64, 2 layers, 4 heads, 2 KV heads: GQA with n_rep = 2)."""
    kw = {**_DEFAULTS, **overrides}
    if arch == "qwen2":
        return Qwen2Config(**kw)
    if arch == "llama":
        return LlamaConfig(**kw)
    raise ValueError(f"unknown tiny arch {arch!r} (qwen2 | llama)")


def tiny_model(arch: str = "qwen2", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised tiny causal LM in eval mode, deterministic by ``seed``."""
    cfg = tiny_config(arch, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        if arch == "qwen2":
            # HF initialises biases to zero; give q/k/v biases values so bias paths are exercised.
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    torch.nn.init.normal_(proj.bias, std=0.02)
    return model.eval()


def random_deltas(model, targets=None, layers=None, *, rank: int | None = None, scale: float = 0.05,
                  seed: int = 0, bias: bool = False) -> dict:
    """Random :class:`~rain_adapter.format.delta.ModuleDelta` for the target linears of ``model``.

    Dense ``[out, in]`` with entries ~ N(0, scale²·|W|²/in), or low-rank (``rank``) with the same scale.
    """
    from ..format.arch import target_linears
    from ..format.delta import ModuleDelta

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, lin in target_linears(model, targets, layers).items():
        o, i = lin.weight.shape
        std = scale * float(lin.weight.detach().float().std())
        # a bias delta only where the layer has a bias (a merged checkpoint could not hold it otherwise)
        b = torch.randn(o, generator=g) * std if bias and lin.bias is not None else None
        if rank is None:
            out[name] = ModuleDelta(delta=torch.randn(o, i, generator=g) * std, bias=b)
        else:
            A = torch.randn(rank, i, generator=g) / i**0.5
            B = torch.randn(o, rank, generator=g) * std * (i / rank) ** 0.5
            out[name] = ModuleDelta(lora_A=A, lora_B=B, bias=b)
    return out
