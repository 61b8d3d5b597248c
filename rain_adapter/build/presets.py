"""Presets for the paper's model triples: ``--preset NAME`` fills LRM / ITM / base Hub ids and names
the output ``rain-<NAME>`` in the adapter home, so ``RainAdapter.attach(lrm, "rain-<NAME>")`` finds it.

The ITM and base must be the pair the LRM was distilled from (a task vector only transfers between
fine-tunes of the same base): DeepSeek-R1-Distill-Qwen-1.5B / -7B start from Qwen2.5-Math-1.5B / -7B,
-14B / -32B from Qwen2.5-14B / -32B, and -Llama-8B from Llama-3.1-8B.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    lrm: str
    itm: str
    base: str


PRESETS: dict[str, Preset] = {
    "qwen1.5b": Preset("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "Qwen/Qwen2.5-Math-1.5B-Instruct", "Qwen/Qwen2.5-Math-1.5B"),
    "qwen7b": Preset("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "Qwen/Qwen2.5-Math-7B-Instruct", "Qwen/Qwen2.5-Math-7B"),
    "qwen14b": Preset("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "Qwen/Qwen2.5-14B-Instruct", "Qwen/Qwen2.5-14B"),
    "qwen32b": Preset("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "Qwen/Qwen2.5-32B-Instruct", "Qwen/Qwen2.5-32B"),
    "llama8b": Preset("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def preset_output_name(name: str) -> str:
    """``rain-<preset>``: the adapter's name in the adapter home."""
    get_preset(name)
    return f"rain-{name}"
