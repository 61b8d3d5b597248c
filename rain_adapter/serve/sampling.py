"""The sampling step's extra parameters (vLLM / OpenAI), as one transformers logits processor.

Per step, for a row with prompt ids ``p`` and generated ids ``g``, on the raw logits ``z``:

1. the raw log-softmax is recorded (``logprobs`` / ``top_logprobs`` report it);
2. ``repetition_penalty`` r (vLLM / transformers): for every token in ``p ∪ g``, ``z ← z / r`` if
   ``z > 0`` else ``z · r``;
3. ``frequency_penalty`` f and ``presence_penalty`` q (OpenAI): ``z_t ← z_t − f·count_g(t) −
   q·[count_g(t) > 0]`` (generated tokens only);
4. ``logit_bias``: ``z_t ← z_t + b_t``;
5. ``min_tokens`` / ``ignore_eos``: the EOS ids get −∞ while ``len(g) < min_tokens`` (always with
   ``ignore_eos``: EOS is never produced);
6. ``top_k`` k ≥ 1: everything below the k-th largest logit gets −∞.

Temperature and top-p are applied after this by transformers (they are monotone, so top-k before
temperature is the same as after). :func:`process_row` is the definition (tested against a float64
reference); :class:`RequestLogitsProcessor` applies it inside ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import bad_request
from .fields import int_field, number_field


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

    @property
    def active(self) -> bool:
        return self != LogitsSpec()


def process_row(z: torch.Tensor, prompt: torch.Tensor, generated: torch.Tensor, spec: LogitsSpec,
                eos_ids: list[int]) -> torch.Tensor:
    """Steps 2–6 of the module doc on one row's logits ``z [V]`` (returns a new tensor)."""
    z = z.clone()
    vocab = z.shape[-1]
    if spec.repetition_penalty != 1.0:
        seen = torch.unique(torch.cat([prompt, generated]).long())
        seen = seen[(seen >= 0) & (seen < vocab)]
        v = z[seen]
        z[seen] = torch.where(v > 0, v / spec.repetition_penalty, v * spec.repetition_penalty)
    if (spec.frequency_penalty or spec.presence_penalty) and generated.numel():
        counts = torch.bincount(generated.long(), minlength=vocab)[:vocab].to(z.dtype)
        z = z - spec.frequency_penalty * counts - spec.presence_penalty * (counts > 0).to(z.dtype)
    for tid, b in spec.logit_bias:
        if 0 <= tid < vocab:
            z[tid] = z[tid] + b
    if spec.ignore_eos or generated.numel() < spec.min_tokens:
        for e in eos_ids:
            if 0 <= e < vocab:
                z[e] = float("-inf")
    if spec.top_k and 0 < spec.top_k < vocab:
        kth = torch.topk(z, spec.top_k).values[-1]
        z = torch.where(z < kth, torch.full_like(z, float("-inf")), z)
    return z


class RequestLogitsProcessor:
    """A transformers ``LogitsProcessor`` for one-request batches: records the raw log-softmax of the
    step (``last``), then applies :func:`process_row` when ``spec`` is active."""

    def __init__(self, spec: LogitsSpec | None, prompt_len: int, eos_ids: list[int], record: bool):
        self.spec = spec if spec is not None and spec.active else None
        self.prompt_len = prompt_len
        self.eos_ids = list(eos_ids)
        self.record = record
        self.last: torch.Tensor | None = None   # [B, V] float32 log-probabilities of the last step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.record:
            self.last = torch.log_softmax(scores.float(), dim=-1).cpu()
        if self.spec is None:
            return scores
        out = scores.clone()
        for b in range(scores.shape[0]):
            row = input_ids[b]
            out[b] = process_row(scores[b], row[: self.prompt_len], row[self.prompt_len:], self.spec, self.eos_ids)
        return out


def _num(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    return float(number_field(body, name, default, lo, hi))


def parse_logits_spec(body: dict, max_tokens: int | None) -> LogitsSpec | None:
    """The request's processing fields (400 naming a bad one); None when they change nothing."""
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
    if not isinstance(lb, dict) or len(lb) > 300:
        raise bad_request("logit_bias must be an object {token id: bias} with at most 300 entries", "logit_bias")
    bias = []
    for k, v in lb.items():
        if not str(k).lstrip("-").isdigit() or isinstance(v, bool) or not isinstance(v, (int, float)) \
                or not -100 <= v <= 100:
            raise bad_request("logit_bias maps token ids to numbers in [-100, 100]", "logit_bias")
        bias.append((int(k), float(v)))
    spec = LogitsSpec(presence_penalty=_num(body, "presence_penalty", 0.0, -2.0, 2.0),
                      frequency_penalty=_num(body, "frequency_penalty", 0.0, -2.0, 2.0), repetition_penalty=rep,
                      logit_bias=tuple(sorted(bias)), top_k=max(0, top_k), min_tokens=min_tokens,
                      ignore_eos=ignore_eos)
    return spec if spec.active else None


__all__ = ["LogitsSpec", "RequestLogitsProcessor", "parse_logits_spec", "process_row"]
