"""Offline tokenizer of the toy world (whole-word byte-level BPE), with R1-distill-style chat templates.

The pipeline is exactly Qwen2's (NFC, Qwen2's pre-tokenisation regex, byte-level BPE), because
``AutoTokenizer`` rebuilds any ``model_type: qwen2`` checkpoint's tokenizer as ``Qwen2Tokenizer``
from the vocab and merges in ``tokenizer.json`` (transformers 5): a ``WordLevel`` model would be
silently replaced by a character-level one. The BPE is trained on the world's own text until every
piece of it is one token, so on the world's text it is a word-level tokenizer (each word, each digit,
each punctuation run one token), and any other text still encodes byte by byte.
``decode(encode(text)) == text`` and character offsets are exact (the calibration code needs them).

Special tokens (names follow ``rain_adapter.testing.fixtures.make_tokenizer``):

====================  =========================================================
``<|bos|>``           begin of sequence, emitted by the chat template (not added by encode)
``<|User|>``          user turn
``<|Assistant|>``     assistant turn
``<|end|>``           end of an assistant turn = eos
``<|pad|>``           padding
``<|unk|>``           unknown token (never produced: the byte-level BPE covers any text)
``<think>``           opens the reasoning block (added token, *not* special: kept by decode)
``</think>``          closes it; the think closing written after reasoning is ``"\\n</think>\\n\\n"``
====================  =========================================================

Chat templates:

- reasoning (LRM): ``<|bos|><|User|>{prompt}<|Assistant|><think>\\n`` as generation prompt, so
  calibration text = template + reasoning + ``"\\n</think>\\n\\n"`` + response (DESIGN §6.2).
- direct (ITM, base): ``<|bos|><|User|>{prompt}<|Assistant|>`` as generation prompt.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<|bos|>"
USER = "<|User|>"
ASSISTANT = "<|Assistant|>"
EOS = "<|end|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
THINK = "<think>"
THINK_END = "</think>"
THINK_CLOSING = "\n</think>\n\n"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, USER, ASSISTANT)
THINK_TOKENS = (THINK, THINK_END)

_TEMPLATE_HEAD = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}" + EOS + ""
    "{% endif %}{% endfor %}"
)
REASONING_CHAT_TEMPLATE = (
    _TEMPLATE_HEAD + "{% if add_generation_prompt %}" + ASSISTANT + THINK + "\n{% endif %}"
)
DIRECT_CHAT_TEMPLATE = _TEMPLATE_HEAD + "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"


QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _pipeline(tok: Tokenizer) -> Tokenizer:
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _segments(texts: Iterable[str]) -> list[str]:
    """The texts cut at every special / thinking marker (markers never reach the BPE model)."""
    pat = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + THINK_TOKENS))
    return [seg for t in texts for seg in pat.split(t) if seg]


def train_backend(texts: Iterable[str], *, max_vocab: int = 4000) -> Tokenizer:
    """Byte-level BPE trained on ``texts`` until every pre-token of them is a single token.

    Ids: the special tokens first (:data:`SPECIAL_TOKENS`), then the 256 bytes, then the merges;
    the thinking markers are added (non-special) tokens after them. Deterministic for given texts.
    """
    texts = _segments(texts)
    tok = _pipeline(Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False)))
    trainer = trainers.BpeTrainer(vocab_size=max_vocab, min_frequency=1, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    split = [p for t in texts for p, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(t))]
    multi = sorted({p for p in split if tok.token_to_id(p) is None})  # pieces are byte-mapped already
    if multi:
        raise ValueError(f"world tokenizer: {len(multi)} pieces are not single tokens (e.g. {multi[:5]}); "
                         f"raise max_vocab={max_vocab}")
    return tok


def make_world_tokenizer(backend: Tokenizer, *, reasoning: bool = True) -> PreTrainedTokenizerFast:
    """A fast tokenizer over a copy of ``backend`` (from :func:`train_backend`).

    ``reasoning=True`` gives the LRM's chat template (generation prompt opens ``<think>``),
    ``False`` the direct template of the ITM / base. Both share ids, so task vectors line up.
    Saved with ``save_pretrained`` and reloaded by ``AutoTokenizer`` (as ``Qwen2Tokenizer`` next to a
    Qwen2 config) it tokenises identically.
    """
    tok = Tokenizer.from_str(backend.to_str())
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False, model_max_length=4096,
    )
    fast.chat_template = REASONING_CHAT_TEMPLATE if reasoning else DIRECT_CHAT_TEMPLATE
    return fast


def chat_prefix(prompt: str, *, reasoning: bool) -> str:
    """The rendered generation prompt (same string as ``apply_chat_template``)."""
    return BOS + USER + prompt + ASSISTANT + (THINK + "\n" if reasoning else "")
