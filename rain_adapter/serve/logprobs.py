"""Log-probabilities: what the sampler saw, prompt tokens by a forward pass, and the OpenAI shapes.

A generated token's logprob is the raw log-softmax of the step's logits (before penalties,
temperature, top-k/top-p: vLLM's default), recorded by
:class:`~rain_adapter.serve.row_logits.BatchLogitsProcessor` for every row of a batch. With ``echo`` and
``logprobs`` on ``/v1/completions`` the prompt's tokens get theirs from a forward pass at the request's λ
(one left-padded pass for all such rows of a batch: :func:`batch_prompt_logprobs`) —
``log_softmax(logits[t-1])[ids[t]]`` for t ≥ 1, None for the first token — which is what lm-eval's
loglikelihood tasks read. Entries are ``(token id, logprob, [(id, logprob) × k])``.

Request fields: completions ``logprobs`` (int 0–20) and ``echo``; chat ``logprobs`` (bool) and
``top_logprobs`` (int 0–20); both: ``prompt_logprobs`` (int 0–20, vLLM's: every prompt token's logprob,
its vocabulary rank and the k most likely, :func:`prompt_logprobs_json`) and
``return_tokens_as_token_ids`` (tokens written ``"token_id:{id}"``). Chat's ``echo`` is not a
logprobs field (it prepends the last assistant message: :mod:`~rain_adapter.serve.responses`).
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import bad_request
from .fields import int_field

MAX_TOP_LOGPROBS = 20
Entry = tuple[int, "float | None", list[tuple[int, float]]]


def parse_logprobs(body: dict, chat: bool) -> tuple[int | None, bool]:
    """(k top alternatives or None for no logprobs, echo) of a request (400 naming a bad field)."""
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise bad_request("echo must be a boolean", "echo")
    if chat:  # chat's echo prepends the last assistant message; it asks for no prompt logprobs
        on = body.get("logprobs", False)
        if not isinstance(on, bool):
            raise bad_request("logprobs must be a boolean on chat completions", "logprobs")
        k = int_field(body, "top_logprobs", 0)
        if not 0 <= k <= MAX_TOP_LOGPROBS:
            raise bad_request(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs")
        if k and not on:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        return (k if on else None), False
    k = int_field(body, "logprobs", None)
    if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
        raise bad_request(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "logprobs")
    return k, echo


def parse_prompt_logprobs(body: dict, stream: bool) -> int | None:
    """``prompt_logprobs`` (vLLM): None, or k in [0, 20] top alternatives per prompt token; not with
    ``stream`` (as vLLM: they come in one piece)."""
    k = int_field(body, "prompt_logprobs", None)
    if k is None:
        return None
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise bad_request(f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {k}", "prompt_logprobs")
    if stream:
        raise bad_request("prompt_logprobs are not available when stream=true", "prompt_logprobs")
    return k


def entry(lp: torch.Tensor, token: int, k: int) -> Entry:
    """One token's entry from a ``[V]`` log-probability vector."""
    top = []
    if k:
        vals, ids = torch.topk(lp, k)
        top = [(int(i), float(v)) for i, v in zip(ids.tolist(), vals.tolist())]
    return int(token), float(lp[token]), top


@torch.inference_mode()
def prompt_logprobs(model, ids: list[int], lam: float, k: int, device, ranks: bool = False):
    """Entries for every prompt token (the first has logprob None) from one forward pass at ``lam``;
    with ``ranks``, ``(entries, ranks)``: token t's rank is ``1 + #{v : lp[t-1][v] > lp[t-1][ids[t]]}``
    (1 = the most likely; None for the first token)."""
    if hasattr(model, "set_lambda"):
        model.set_lambda(torch.tensor([lam], dtype=torch.float32))
    x = torch.tensor([ids], dtype=torch.long, device=device)
    logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1).cpu()
    out: list[Entry] = [(int(ids[0]), None, [])]
    for t in range(1, len(ids)):
        out.append(entry(lp[t - 1], ids[t], k))
    return (out, [None] + vocab_ranks(lp[: len(ids) - 1], ids[1:])) if ranks else out


def vocab_ranks(lp: torch.Tensor, ids: list[int]) -> list[int]:
    """Rank of ``ids[t]`` in row t of ``lp [N, V]``: ``1 + #{v : lp[t, v] > lp[t, ids[t]]}`` (1 = most likely)."""
    if not ids:
        return []
    chosen = lp.gather(1, torch.tensor(ids, dtype=torch.long)[:, None])
    return [int(r) for r in ((lp > chosen).sum(dim=1) + 1).tolist()]


#: logits elements (rows × positions × vocabulary) one echo forward may hold; more rows go in several passes
ECHO_LOGITS_BUDGET = 1 << 26


@torch.inference_mode()
def batch_prompt_logprobs(model, prompts: list[list[int]], lams: list[float], ks: list[int], pad_id: int,
                          device) -> list[tuple[list[Entry], list[int | None]]]:
    """:func:`prompt_logprobs` of several prompts from one left-padded forward ``[B, T]`` with per-row λ
    ``[B]`` (rows split into passes of at most :data:`ECHO_LOGITS_BUDGET` logits). Positions are counted
    from each row's first real token (``cumsum(mask) − 1``, as ``generate`` does), so a row sees what it
    sees alone; the values agree with a lone forward to float rounding. Each row comes back as ``(entries, ranks)``
    (:func:`vocab_ranks`; None for the first token)."""
    out: list[tuple[list[Entry], list[int | None]]] = []
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1)
    i = 0
    while i < len(prompts):
        T = len(prompts[i])
        j = i + 1
        while j < len(prompts) and (j + 1 - i) * max(T, len(prompts[j])) * vocab <= ECHO_LOGITS_BUDGET:
            T = max(T, len(prompts[j]))
            j += 1
        out.extend(_echo_pass(model, prompts[i:j], lams[i:j], ks[i:j], pad_id, device))
        i = j
    return out


def _echo_pass(model, prompts, lams, ks, pad_id, device) -> list[tuple[list[Entry], list[int | None]]]:
    B, T = len(prompts), max(len(p) for p in prompts)
    x = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, p in enumerate(prompts):
        x[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    if hasattr(model, "set_lambda"):
        model.set_lambda(torch.tensor(lams, dtype=torch.float32))
    logits = model(input_ids=x.to(device), attention_mask=mask.to(device), position_ids=pos.to(device)).logits
    res = []
    for b, (p, k) in enumerate(zip(prompts, ks)):
        lp = torch.log_softmax(logits[b, T - len(p):].float(), dim=-1).cpu()
        entries = [(int(p[0]), None, [])] + [entry(lp[t - 1], p[t], k) for t in range(1, len(p))]
        res.append((entries, [None] + vocab_ranks(lp[: len(p) - 1], list(p[1:]))))
    return res


def _text(tok, i: int, as_id: bool = False) -> str:
    """A token's text, or ``"token_id:{i}"`` (``return_tokens_as_token_ids``)."""
    if as_id:
        return f"token_id:{int(i)}"
    return tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def completion_logprobs(tok, entries: list[Entry], offset: int = 0, as_ids: bool = False) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset.

    Each position's ``top_logprobs`` holds the token itself and the k most likely (vLLM's and OpenAI's
    legacy shape), so ``logprobs=0`` gives the chosen token alone. ``as_ids``: tokens are written
    ``"token_id:{id}"`` (vLLM's ``return_tokens_as_token_ids``; ``text_offset`` still counts the text)."""
    tokens, lps, tops, offs = [], [], [], []
    for tid, lp, top in entries:
        s = _text(tok, tid, as_ids)
        tokens.append(s)
        lps.append(lp)
        # as vLLM: the chosen token first, then the top k (k or k + 1 entries; logprobs=0 gives the chosen one)
        tops.append({s: lp, **{t: v for t, v in ((_text(tok, i, as_ids), v) for i, v in top) if t != s}}
                    if lp is not None else None)
        offs.append(offset)
        offset += len(_text(tok, tid)) if as_ids else len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


def chat_logprobs(tok, entries: list[Entry], as_ids: bool = False) -> dict[str, Any]:
    """The chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}`` (``as_ids``:
    each token written ``"token_id:{id}"``)."""
    def item(i: int, v: float) -> dict[str, Any]:
        s = _text(tok, i, as_ids)
        return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**item(tid, lp), "top_logprobs": [item(i, v) for i, v in top]}
                        for tid, lp, top in entries]}


def prompt_logprobs_json(tok, entries: list[Entry], ranks: list[int | None] | None, k: int) -> list:
    """vLLM's ``prompt_logprobs``: None for the first prompt token, then per token
    ``{"<id>": {"logprob", "rank", "decoded_token"}}`` for the token itself and its k most likely
    alternatives (rank 1..k in that order)."""
    out: list = []
    for t, (tid, lp, top) in enumerate(entries):
        if lp is None:
            out.append(None)
            continue
        rank = ranks[t] if ranks is not None and t < len(ranks) else None
        d = {str(tid): {"logprob": lp, "rank": rank, "decoded_token": _text(tok, tid)}}
        for r, (i, v) in enumerate(top[:k], start=1):
            d.setdefault(str(i), {"logprob": v, "rank": r, "decoded_token": _text(tok, i)})
        out.append(d)
    return out


__all__ = ["ECHO_LOGITS_BUDGET", "MAX_TOP_LOGPROBS", "batch_prompt_logprobs", "chat_logprobs", "completion_logprobs", "entry", "parse_logprobs",
           "parse_prompt_logprobs", "prompt_logprobs", "prompt_logprobs_json", "vocab_ranks"]
