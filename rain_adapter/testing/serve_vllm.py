"""SmolLM2-135M-Instruct (real weights) + a random low-rank adapter: what ``rain serve --engine vllm``
is tested and benchmarked on (``tests/test_serve_vllm.py``, ``bench/serve_engines.py``).

vLLM loads real checkpoints (its CPU attention has no kernel for the tiny test models' head size
16); SmolLM2 (30 layers, hidden 576, 9 heads of 64) is the real-weights model this project already
carries (:mod:`rain_adapter.demo.smollm2`). The adapter is random (``testing.tiny.random_deltas``,
low-rank so it exports as a LoRA): a serving test needs λ to change the greedy text, not a
meaningful instruction direction.
"""

from __future__ import annotations

from pathlib import Path


def build_smollm2_lora_adapter(root: str | Path, *, rank: int = 8, scale: float = 0.1, seed: int = 0,
                               lambda_range: tuple[float, float] = (0.0, 2.0)) -> tuple[Path, Path]:
    """(SmolLM2 checkpoint dir, ``root/adapter``): a random rank-``rank`` adapter on every
    q/k/v/o/gate/up/down of SmolLM2, with its fingerprint. Raises
    :class:`~rain_adapter.demo.smollm2.RealWeightsUnavailable` when the weights cannot be had."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..demo.smollm2 import ensure_safetensors_copy
    from ..format.config import RainConfig
    from ..format.fingerprint import compute_fingerprint
    from ..format.store import save_adapter
    from .tiny import random_deltas

    model_dir = ensure_safetensors_copy()
    adapter_dir = Path(root) / "adapter"
    if (adapter_dir / "adapter_config.json").is_file():
        return model_dir, adapter_dir
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    deltas = random_deltas(model, rank=rank, scale=scale, seed=seed)
    cfg = RainConfig(base_model_name_or_path=str(model_dir), layers=list(range(model.config.num_hidden_layers)),
                     storage="lowrank", rank=rank, lambda_range=list(lambda_range), default_lambda=1.0,
                     fingerprint=compute_fingerprint(model, list(deltas)))
    save_adapter(deltas, cfg, adapter_dir, overwrite=True)
    return model_dir, adapter_dir


__all__ = ["build_smollm2_lora_adapter"]
