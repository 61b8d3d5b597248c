"""Is the world sound? The LRM, ITM and base on their held-out evaluation prompts.

- LRM, reasoning template, held-out additions with one format instruction each: thinking-format
  validity (want ≥ 95 %), accuracy, compliance (low: it ignores format instructions).
- ITM, direct template, easy questions with one instruction each: compliance (want ≥ 90 %),
  thinking rate (want 0).
- base, both, for reference.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from rain_adapter.evaluation.sweep import evaluate_rows, generate_responses, load_model, load_prompts

from .train import WorldPaths

DIRECT_TOKENS = 40


def max_new_tokens(n_digits: int, reasoning: bool) -> int:
    """Enough for the longest trace (≈ 16 tokens per column) plus the longest formatted answer."""
    return 16 * (n_digits + 2) + 40 if reasoning else DIRECT_TOKENS


def evaluate_model(path, rows: list[dict[str, Any]], *, max_new_tokens: int, batch_size: int = 64,
                   progress: bool = False, template_from=None) -> tuple[dict[str, float], list[str]]:
    """Metrics and responses of the checkpoint at ``path`` on ``rows`` (its own chat template unless
    ``template_from`` names another checkpoint whose tokenizer to use)."""
    model, tok = load_model(path)
    if template_from is not None:
        tok = _tokenizer(template_from)
    resp = generate_responses(model, tok, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                              batch_size=batch_size, progress=progress)
    return evaluate_rows(rows, resp), resp


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@torch.no_grad()
def evaluate_world(paths: WorldPaths, *, limit: int | None = None, progress: bool = False) -> dict[str, Any]:
    """The soundness table: {lrm, itm, base_reasoning, base_direct, itm_on_reasoning_prompts} → metrics.

    ``itm_on_reasoning_prompts``: the ITM (its own direct template) on the LRM's instructed
    reasoning prompts, whose compliance is the demo's c_ITM.
    """
    info = json.loads(paths.info.read_text())
    n_digits = info["config"]["n_digits"]
    r_rows = load_prompts(paths.eval_reasoning, limit)
    d_rows = load_prompts(paths.eval_direct, limit)
    rt, dt = max_new_tokens(n_digits, True), max_new_tokens(n_digits, False)
    out: dict[str, Any] = {}
    out["lrm"], _ = evaluate_model(paths.lrm, r_rows, max_new_tokens=rt, progress=progress)
    out["itm"], _ = evaluate_model(paths.itm, d_rows, max_new_tokens=dt, progress=progress)
    out["base_reasoning"], _ = evaluate_model(paths.base, r_rows, max_new_tokens=rt, progress=progress,
                                              template_from=paths.lrm)
    out["base_direct"], _ = evaluate_model(paths.base, d_rows, max_new_tokens=dt, progress=progress)
    out["itm_on_reasoning_prompts"], _ = evaluate_model(paths.itm, r_rows, max_new_tokens=rt, progress=progress)
    return out


def is_sound(metrics: dict[str, Any], *, min_format: float = 0.95, min_itm: float = 0.9,
             min_acc: float = 0.2) -> list[str]:
    """The failed soundness properties (empty list = sound). Written as ``not (x >= floor)`` so a
    NaN metric fails."""
    bad = []
    lrm, itm = metrics["lrm"], metrics["itm"]
    if not lrm["format_validity"] >= min_format:
        bad.append(f"LRM format validity {lrm['format_validity']:.2f} < {min_format}")
    if not lrm["accuracy"] >= min_acc:
        bad.append(f"LRM accuracy {lrm['accuracy']:.2f} < {min_acc}")
    if not lrm["compliance"] <= 0.5:
        bad.append(f"LRM compliance {lrm['compliance']:.2f} is not low")
    if not itm["compliance"] >= min_itm:
        bad.append(f"ITM compliance {itm['compliance']:.2f} < {min_itm}")
    if not itm["thinking_rate"] <= 0.0:
        bad.append(f"ITM thinks on {itm['thinking_rate']:.2f} of its prompts")
    return bad
