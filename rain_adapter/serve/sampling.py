"""The sampling step's extra parameters (vLLM / OpenAI): their parse and the one-row definition.

Per step, for a row with prompt ids ``p`` and generated ids ``g``, on the raw logits ``z [V]``:

1. the raw log-softmax is recorded (``logprobs`` / ``top_logprobs`` report it);
2. ``repetition_penalty`` r (vLLM / transformers): for every token in ``p ∪ g``, ``z ← z / r`` if
   ``z > 0`` else ``z · r``;
3. ``frequency_penalty`` f and ``presence_penalty`` q (OpenAI): ``z_t ← z_t − f·count_g(t) −
   q·[count_g(t) > 0]`` (generated tokens only);
4. ``logit_bias``: ``z_t ← z_t + b_t``;
5. bans (−∞): tokens outside ``allowed_token_ids`` (when given); for each ``bad_words`` token sequence
   ``w``, its last token ``w[-1]`` when ``g`` ends with ``w[:-1]`` (always for a one-token word); the EOS ids
   and ``stop_token_ids`` while ``len(g) < min_tokens``; the EOS ids always with ``ignore_eos`` (EOS is
   never produced);
6. ``top_k`` k ≥ 1: everything below the k-th largest logit gets −∞;
7. ``min_p`` m > 0 (vLLM: keep tokens whose probability at the request's temperature T is at least
   m × the largest): keep ``z_t ≥ max(z) + T·ln m`` (``softmax(z/T)_t ≥ m·max softmax(z/T)`` written on
   the untempered logits, so it can run before transformers applies T; greedy T = 0 keeps the argmax).

Temperature and top-p are applied after this by transformers (top-k and min-p commute with the
monotone temperature as written). ``stop_token_ids`` also end the row (the token counts in
``completion_tokens`` and the logprobs, its text is not in the output, ``stop_reason`` is the id: vLLM).
``bad_words`` are strings, tokenised as vLLM does (:func:`bad_words_ids`: the word and, when it makes a
new first token of the same length, the word after a space).

:func:`process_row` is the definition (tested against a float64 reference);
:class:`~rain_adapter.serve.row_logits.BatchLogitsProcessor` applies it to every row of a batch at
once inside ``generate``; :class:`RequestLogitsProcessor` is its one-request form.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .errors import bad_request
from .fields import int_field, number_field

#: caps on the list-valued fields (a request is a bounded amount of work)
MAX_LOGIT_BIAS = 300
MAX_STOP_TOKEN_IDS = 64
MAX_BAD_WORDS = 64
MAX_BAD_WORD_CHARS = 256


@dataclass(frozen=True)
class LogitsSpec:
    """The per-request processing; the defaults change nothing."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_k: int = 0
    min_tokens: int = 0
    ignore_eos: bool = False
    min_p: float = 0.0
    allowed_token_ids: tuple[int, ...] = ()       # empty: every token allowed
    bad_words: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    @property
    def active(self) -> bool:
        return self != LogitsSpec()

    @property
    def logits_active(self) -> bool:
        """Whether the logits change (``stop_token_ids`` alone only end the row: the row tracker's job)."""
        return replace(self, stop_token_ids=()) != LogitsSpec()


def bad_words_ids(tokenizer, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """vLLM's ``SamplingParams.update_from_tokenizer``: each word ``w.lstrip()`` tokenised without special
    tokens, and ``" " + w.lstrip()`` too when that gives a different first token and the same length."""
    return _bad_words_ids(tokenizer, tuple(words))


@functools.lru_cache(maxsize=256)
def _bad_words_ids(tokenizer, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    out: list[tuple[int, ...]] = []
    for w in words:
        plain = tuple(tokenizer.encode(w.lstrip(), add_special_tokens=False))
        if plain:
            out.append(plain)
        spaced = tuple(tokenizer.encode(" " + w.lstrip(), add_special_tokens=False))
        if spaced and plain and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return tuple(out)


def process_row(z: torch.Tensor, prompt: torch.Tensor, generated: torch.Tensor, spec: LogitsSpec,
                eos_ids: list[int], temperature: float = 1.0,
                bad_ids: Sequence[Sequence[int]] = ()) -> torch.Tensor:
    """Steps 2–7 of the module doc on one row's logits ``z [V]`` (returns a new tensor).

    ``bad_ids``: the token sequences of ``spec.bad_words`` (:func:`bad_words_ids`)."""
    z = z.clone()
    vocab = z.shape[-1]
    prompt, generated = prompt.to(z.device), generated.to(z.device)
    if spec.repetition_penalty != 1.0:
        seen = torch.unique(torch.cat([prompt, generated]).long())
        seen = seen[(seen >= 0) & (seen < vocab)]
        v = z[seen]
        z[seen] = torch.where(v > 0, v / spec.repetition_penalty, v * spec.repetition_penalty)
    if (spec.frequency_penalty or spec.presence_penalty) and generated.numel():
        counts = torch.bincount(generated.long(), minlength=vocab)[:vocab].to(z.dtype)
        z = z - spec.frequency_penalty * counts - spec.presence_penalty * (counts > 0).to(z.dtype)
    for tid, b in spec.logit_bias:
        z[tid] = z[tid] + b
    if spec.allowed_token_ids:
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[list(spec.allowed_token_ids)] = True
        z = z.masked_fill(~keep.to(z.device), float("-inf"))
    gen = generated.tolist()
    for w in bad_ids:
        if len(w) <= len(gen) + 1 and (len(w) == 1 or gen[len(gen) - len(w) + 1:] == list(w[:-1])):
            z[w[-1]] = float("-inf")
    banned = list(eos_ids) if spec.ignore_eos else []
    if generated.numel() < spec.min_tokens:
        banned += list(eos_ids) + list(spec.stop_token_ids)
    for e in banned:
        if 0 <= e < vocab:
            z[e] = float("-inf")
    if spec.top_k and 0 < spec.top_k < vocab:
        kth = torch.topk(z, spec.top_k).values[-1]
        z = torch.where(z < kth, torch.full_like(z, float("-inf")), z)
    if spec.min_p > 0:
        floor = z.max() + max(float(temperature), 0.0) * math.log(spec.min_p)
        z = torch.where(z < floor, torch.full_like(z, float("-inf")), z)
    return z


class RequestLogitsProcessor:
    """A transformers ``LogitsProcessor`` for one-request batches: records the raw log-softmax of the
    step (``last``), then applies :func:`process_row` when ``spec`` is active."""

    def __init__(self, spec: LogitsSpec | None, prompt_len: int, eos_ids: list[int], record: bool,
                 temperature: float = 1.0, bad_ids: Sequence[Sequence[int]] = ()):
        self.spec = spec if spec is not None and spec.active else None
        self.prompt_len = prompt_len
        self.eos_ids = list(eos_ids)
        self.record = record
        self.temperature = temperature
        self.bad_ids = bad_ids
        self.last: torch.Tensor | None = None   # [B, V] float32 log-probabilities of the last step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.record:
            self.last = torch.log_softmax(scores.float(), dim=-1).cpu()
        if self.spec is None:
            return scores
        out = scores.clone()
        for b in range(scores.shape[0]):
            row = input_ids[b]
            out[b] = process_row(scores[b], row[: self.prompt_len], row[self.prompt_len:], self.spec, self.eos_ids,
                                 self.temperature, self.bad_ids)
        return out


def _num(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    return float(number_field(body, name, default, lo, hi))


def _token_ids(body: dict, name: str, cap: int, vocab_size: int | None, nonempty: bool = False) -> tuple[int, ...]:
    """A list of token ids (400 naming ``name``): ints in ``[0, vocab_size)``, at most ``cap``."""
    v = body.get(name)
    if v is None:
        return ()
    if not isinstance(v, list) or len(v) > cap or (nonempty and not v):
        raise bad_request(f"{name} must be a {'non-empty ' if nonempty else ''}list of at most {cap} token ids",
                          name)
    for t in v:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise bad_request(f"{name} must hold non-negative integer token ids, got {t!r}", name)
        if vocab_size is not None and t >= vocab_size:
            raise bad_request(f"{name} holds token id {t}, outside the vocabulary [0, {vocab_size})", name)
    return tuple(dict.fromkeys(v))


def _bad_words(body: dict) -> tuple[str, ...]:
    v = body.get("bad_words")
    if v is None:
        return ()
    if not isinstance(v, list) or len(v) > MAX_BAD_WORDS or not all(
            isinstance(w, str) and w.strip() and len(w) <= MAX_BAD_WORD_CHARS for w in v):
        raise bad_request(f"bad_words must be a list of at most {MAX_BAD_WORDS} non-blank strings of at most "
                          f"{MAX_BAD_WORD_CHARS} characters", "bad_words")
    return tuple(v)


def parse_logits_spec(body: dict, max_tokens: int | None, vocab_size: int | None = None) -> LogitsSpec | None:
    """The request's processing fields (400 naming a bad one); None when they change nothing.

    ``vocab_size``: the model's logits width; a ``logit_bias`` / ``allowed_token_ids`` id outside it is a
    400 (as vLLM)."""
    rep = _num(body, "repetition_penalty", 1.0, 0.0, 2.0)
    if rep <= 0:
        raise bad_request("repetition_penalty must be > 0", "repetition_penalty")
    top_k = int_field(body, "top_k", 0)
    if top_k < -1:
        raise bad_request("top_k must be -1 / 0 (off) or at least 1", "top_k")
    min_tokens = int_field(body, "min_tokens", 0)
    if min_tokens < 0 or (max_tokens is not None and min_tokens > max_tokens):
        raise bad_request("min_tokens must be in [0, max_tokens]", "min_tokens")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad_request("ignore_eos must be a boolean", "ignore_eos")
    lb = body.get("logit_bias") or {}
    if not isinstance(lb, dict) or len(lb) > MAX_LOGIT_BIAS:
        raise bad_request(f"logit_bias must be an object {{token id: bias}} with at most {MAX_LOGIT_BIAS} entries",
                          "logit_bias")
    bias = []
    for k, v in lb.items():
        if not str(k).lstrip("-").isdigit() or isinstance(v, bool) or not isinstance(v, (int, float)) \
                or not -100 <= v <= 100:
            raise bad_request("logit_bias maps token ids to numbers in [-100, 100]", "logit_bias")
        tid = int(k)
        if tid < 0 or (vocab_size is not None and tid >= vocab_size):
            raise bad_request(f"logit_bias holds token id {tid}, outside the vocabulary [0, {vocab_size})",
                              "logit_bias")
        bias.append((tid, float(v)))
    allowed = _token_ids(body, "allowed_token_ids", vocab_size or 1 << 24, vocab_size, nonempty=True)
    spec = LogitsSpec(presence_penalty=_num(body, "presence_penalty", 0.0, -2.0, 2.0),
                      frequency_penalty=_num(body, "frequency_penalty", 0.0, -2.0, 2.0), repetition_penalty=rep,
                      logit_bias=tuple(sorted(bias)), top_k=max(0, top_k), min_tokens=min_tokens,
                      ignore_eos=ignore_eos, min_p=_num(body, "min_p", 0.0, 0.0, 1.0),
                      allowed_token_ids=tuple(sorted(allowed)), bad_words=_bad_words(body),
                      stop_token_ids=_token_ids(body, "stop_token_ids", MAX_STOP_TOKEN_IDS, None))
    return spec if spec.active else None


__all__ = ["LogitsSpec", "MAX_BAD_WORDS", "MAX_LOGIT_BIAS", "MAX_STOP_TOKEN_IDS", "RequestLogitsProcessor",
           "bad_words_ids", "parse_logits_spec", "process_row"]
