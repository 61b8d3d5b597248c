"""Offline test fixtures: a byte-level tokenizer with an R1-style chat template, and a tiny model triple.

Shared by the whole test suite, the examples and the benches. Nothing here touches the network.

Tokenizer (``make_tokenizer``)
    Byte-level BPE with no merges: every UTF-8 byte is one token (256 ids), so any text, LaTeX
    included, tokenises, and ``return_offsets_mapping=True`` gives character offsets into the
    original string (a multi-byte character yields several tokens sharing its span).
    Special tokens (each a single id, never split):

    ========================  =====================================================
    ``<|begin|>``             BOS; added by the post-processor *and* by the template
                              (like the R1-distill tokenizers, so BOS handling is tested)
    ``<|User|>``              opens a user turn
    ``<|Assistant|>``         opens an assistant turn
    ``<|end|>``               EOS / end of an assistant turn
    ``<think>`` ``</think>``  thinking markers
    ``<|pad|>``               padding
    ``<|unk|>``               unknown (never produced; declared so that tokenizer classes
                              such as Qwen2Tokenizer do not add their own)
    ========================  =====================================================

    Chat template (R1-distill style)::

        <|begin|>[system]<|User|>{prompt}<|Assistant|>{answer}<|end|> ... <|Assistant|><think>\\n

    i.e. the generation prompt opens ``<think>\\n``.

Tiny triple (``make_tiny_triple``)
    Qwen2 or Llama, hidden 64, 2 layers, 4 heads, 2 kv heads (GQA), vocab = tokenizer size.
    base = random init; ITM = base + (low-rank + noise) perturbation of every decoder linear with
    ‖Δ‖/‖W‖ ≈ ``itm_scale`` (and changed q/k/v biases for Qwen2); LRM = base + another one.
    Each saved with ``save_pretrained(max_shard_size=...)`` small enough to be sharded with an
    index, plus the tokenizer. Deterministic by seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch

BOS_TOKEN = "<|begin|>"
USER_TOKEN = "<|User|>"
ASSISTANT_TOKEN = "<|Assistant|>"
EOS_TOKEN = "<|end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (BOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, EOS_TOKEN, THINK_OPEN, THINK_CLOSE, PAD_TOKEN, UNK_TOKEN)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER_TOKEN + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT_TOKEN + "{{ message['content'] }}" + EOS_TOKEN +
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT_TOKEN + THINK_OPEN + "\n{% endif %}"
)

# A template without thinking markers (plain chat model); used to test the "no markers" error.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER_TOKEN + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT_TOKEN + "{{ message['content'] }}" + EOS_TOKEN +
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT_TOKEN + "{% endif %}"
)


@dataclass(frozen=True)
class TriplePaths:
    """Directories of a saved model triple: ``base`` (θ_B), ``itm`` (θ_I), ``lrm`` (θ_R)."""

    base: Path
    itm: Path
    lrm: Path


def make_tokenizer(padding_side: str = "right", chat_template: str | None = None):
    """Offline byte-level ``PreTrainedTokenizerFast`` with the special tokens and template above.

    ``len(tokenizer) == 256 + 8``; ids 0..255 are bytes, the special tokens follow in the order of
    ``SPECIAL_TOKENS``. ``chat_template`` overrides the R1-style template (e.g. ``PLAIN_CHAT_TEMPLATE``).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # Stable order: by the byte each unicode char stands for.
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars, key=_byte_of_char))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
            special_tokens=[(BOS_TOKEN, bos_id)]),
    ])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN,
        padding_side=padding_side, model_max_length=1 << 20,
    )
    fast.add_special_tokens({"additional_special_tokens": [USER_TOKEN, ASSISTANT_TOKEN, THINK_OPEN, THINK_CLOSE]})
    fast.chat_template = chat_template if chat_template is not None else CHAT_TEMPLATE
    return fast


def _byte_of_char(ch: str) -> int:
    return _BYTE_DECODER[ch]


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_BYTE_DECODER = {v: k for k, v in _bytes_to_unicode().items()}


def tiny_triple_config(arch: str = "qwen2", vocab_size: int | None = None, **overrides: Any):
    """The HF config of the tiny triple (hidden 64, 2 layers, 4 heads, 2 kv heads, vocab = tokenizer)."""
    from transformers import LlamaConfig, Qwen2Config

    if vocab_size is None:
        vocab_size = len(make_tokenizer())
    tok_ids = dict(bos_token_id=256 + SPECIAL_TOKENS.index(BOS_TOKEN),
                   eos_token_id=256 + SPECIAL_TOKENS.index(EOS_TOKEN),
                   pad_token_id=256 + SPECIAL_TOKENS.index(PAD_TOKEN))
    kw: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
        tie_word_embeddings=False, **tok_ids,
    )
    kw.update(overrides)
    if arch == "qwen2":
        return Qwen2Config(**kw)
    if arch == "llama":
        return LlamaConfig(**kw)
    raise ValueError(f"make_tiny_triple: unknown arch {arch!r} (expected 'qwen2' or 'llama')")


def _perturb(state: dict[str, torch.Tensor], gen: torch.Generator, scale: float, rank: int,
             bias_scale: float) -> dict[str, torch.Tensor]:
    """Return a fine-tune-like copy: every decoder linear W ← W + E with E = low-rank + noise,
    ‖E‖/‖W‖ ≈ scale (80% of the energy low-rank); biases (q/k/v in Qwen2) get b + bias_scale·N(0, σ_b)."""
    out = {}
    for name, w in state.items():
        if ".layers." in name and name.endswith("_proj.weight"):
            o, i = w.shape
            r = min(rank, o, i)
            lr = torch.randn(o, r, generator=gen) @ torch.randn(r, i, generator=gen)
            noise = torch.randn(o, i, generator=gen)
            e = 0.9 * lr / lr.norm() + 0.45 * noise / noise.norm()
            out[name] = w + (scale * w.norm() / e.norm()) * e
        elif ".layers." in name and name.endswith("_proj.bias"):
            ref = max(float(w.std()), 0.02)
            out[name] = w + bias_scale * ref * torch.randn(w.shape, generator=gen)
        else:
            out[name] = w.clone()
    return out


def make_tiny_triple(root: str | Path, arch: str = "qwen2", seed: int = 0, *, itm_scale: float = 0.04,
                     lrm_scale: float = 0.04, perturb_rank: int = 4, max_shard_size: str = "100KB",
                     tokenizer_padding_side: str = "right", **cfg: Any) -> TriplePaths:
    """Build and save base / ITM / LRM under ``root/{base,itm,lrm}`` (sharded safetensors + index +
    tokenizer + config). ``cfg`` overrides the HF config (e.g. ``hidden_size=96``). Deterministic by seed.

    Qwen2's random init has zero q/k/v biases; the base gets small random ones so that the
    fine-tunes "change" them like real ones do.
    """
    from transformers import AutoModelForCausalLM

    root = Path(root)
    tok = make_tokenizer(padding_side=tokenizer_padding_side)
    config = tiny_triple_config(arch, vocab_size=len(tok), **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k, v in base_state.items():
        if k.endswith("_proj.bias"):
            base_state[k] = 0.02 * torch.randn(v.shape, generator=gen)
    itm_state = _perturb(base_state, gen, itm_scale, perturb_rank, bias_scale=1.0)
    lrm_state = _perturb(base_state, gen, lrm_scale, perturb_rank, bias_scale=1.0)
    paths = TriplePaths(base=root / "base", itm=root / "itm", lrm=root / "lrm")
    for path, state in ((paths.base, base_state), (paths.itm, itm_state), (paths.lrm, lrm_state)):
        model.load_state_dict(state, strict=True)
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path, max_shard_size=max_shard_size)
        tok.save_pretrained(path)
    return paths


def make_reasoning_samples(n: int = 8, seed: int = 0) -> list[dict[str, str]]:
    """Short synthetic reasoning-calibration samples {prompt, reasoning, response} (ASCII + a bit of
    LaTeX), for tests that must not depend on the shared data file."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append({
            "prompt": f"Problem {i}: compute $\\frac{{{a}}}{{2}} + {b}$.",
            "reasoning": f"Okay, half of {a} is {a / 2}. Then add {b}: {a / 2 + b}. Check: fine.",
            "response": f"The answer is $\\boxed{{{a / 2 + b}}}$.",
        })
    return out


def write_reasoning_calib(path: str | Path, n: int = 8, seed: int = 0, jsonl: bool = False) -> Path:
    """Write ``make_reasoning_samples(n, seed)`` as JSON (list) or JSONL."""
    path = Path(path)
    samples = make_reasoning_samples(n, seed)
    if jsonl:
        path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    else:
        path.write_text(json.dumps(samples))
    return path


def make_instruction_records(topics: Sequence[str] = ("owls", "rivers", "bread")) -> list[dict[str, Any]]:
    """Stage 2 instruction-calibration records (DESIGN §6.3's shape): per topic two instructions,
    "two lines" (related response spans: the lines) and "end with Done", plus unrelated spans."""
    recs = []
    for i, t in enumerate(topics):
        recs.append({
            "id": i, "prompt": f"Write two lines about {t}. End with the word Done.",
            "reason": f"Two lines on {t}, then the ending word.",
            "response": f"Sure.\nLine one on {t}.\nLine two on {t}.\nThat is all. Done",
            "related_prompt_list": [
                {"instruction_id": "length", "prompt_spans": [f"Write two lines about {t}"],
                 "response_spans": [f"Line one on {t}", f"Line two on {t}"]},
                {"instruction_id": "end", "prompt_spans": ["End with the word Done"], "response_spans": ["Done"],
                 "unrelated_response_spans": ["Line one"]},
            ],
            "unrelated_response_spans": ["Sure.", "That is all"],
        })
    return recs


def assert_same_adapter_tensors(a: str | Path, b: str | Path) -> None:
    """Two adapter directories hold the same tensor names with bit-identical values (``torch.equal``)."""
    from rain_adapter.format.store import read_tensors

    ta, tb = read_tensors(Path(a)), read_tensors(Path(b))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
