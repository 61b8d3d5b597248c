"""One-shot greedy continuous batching with one λ per prompt (no server): what the continuous
scheduler does per step (:mod:`~rain_adapter.serve.continuous`), as a function to test and measure
it against ``model.generate`` row by row."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .continuous import TokenLambdaHook, _greedy_generation_config, cb_config


@torch.no_grad()
def continuous_generate(model, prompts: Sequence[Sequence[int]], lambdas: Sequence[float], *,
                        max_new_tokens: int = 16, eos_token_id: int | list[int] | None = None,
                        config=None, timeout: float = 120.0) -> list[list[int]]:
    """Greedy continuous batching of ``prompts`` with one λ each; returns the generated ids per prompt.

    ``model``: a ``RainModel``. Same tokens as ``model.generate(p, rain_lambda=l, do_sample=False)``
    per prompt (up to float reassociation in the packed attention).
    """
    if len(prompts) != len(lambdas):
        raise ValueError(f"rain_adapter.serve.cb_generate: {len(prompts)} prompts but {len(lambdas)} λ")
    hf = model.model
    manager = hf.init_continuous_batching(
        generation_config=_greedy_generation_config(hf, max_new_tokens, eos_token_id),
        continuous_batching_config=config or cb_config(max_requests=max(1, len(prompts)), device=hf.device))
    lam_by_id = {f"rain_{i}": float(l) for i, l in enumerate(lambdas)}
    hook = TokenLambdaHook(model, manager, lam_by_id.__getitem__)
    old = model.get_lambda()
    manager.start()
    results: dict[str, list[int]] = {}
    try:
        for i, p in enumerate(prompts):
            manager.add_request(list(p), request_id=f"rain_{i}", max_new_tokens=max_new_tokens)
        deadline = time.monotonic() + timeout
        while len(results) < len(prompts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rain_adapter.serve.cb_generate: {len(prompts) - len(results)} requests unfinished")
            out = manager.get_result(timeout=0.5)
            if out is None:
                if not manager.is_running():
                    raise RuntimeError("rain_adapter.serve.continuous: the generation loop stopped "
                                       f"({manager.background_thread_status.fatal_error})")
                continue
            if out.error:
                raise RuntimeError(f"rain_adapter.serve.continuous: request {out.request_id} failed: {out.error}")
            if out.is_finished():
                results[out.request_id] = list(out.generated_tokens)
    finally:
        manager.stop(block=True, timeout=30)
        manager.destroy()
        hook.remove()
        model.set_lambda(old)
    return [results[f"rain_{i}"] for i in range(len(prompts))]


__all__ = ["continuous_generate"]
