"""Presets for model triples: ``--preset NAME`` fills LRM / ITM / base Hub ids and names the output
``rain-<NAME>`` in the adapter home, so ``RainAdapter.attach(lrm, "rain-<NAME>")`` finds it.
``rain build --list-presets`` prints them.

The plain names (``qwen1.5b``, ``qwen7b``, ``qwen14b``, ``qwen32b``, ``llama8b``) are the paper's
triples: for every DeepSeek-R1-Distill LRM the ITM and base are the general Qwen2.5 line of the
same size (``Qwen/Qwen2.5-7B-Instruct`` and ``Qwen/Qwen2.5-7B`` for R1-Distill-Qwen-7B) or
Llama-3.1-8B-Instruct / Llama-3.1-8B for R1-Distill-Llama-8B, as in the paper's experiments and
the method authors' code (its scripts default to the 7B general-line triple). Those are the
numbers a preset reproduces.

R1-Distill-Qwen-1.5B / -7B were distilled from Qwen2.5-Math-1.5B / -7B, not from the general
line, so the Math line shares their base; ``qwen1.5b-math`` / ``qwen7b-math`` keep those triples
(Qwen2.5-Math-*-Instruct and Qwen2.5-Math-*) under their own names. The two lines differ in more
than weights: the 7B Math configs have ``rope_theta`` 10000 where the general line has 1e6, which
the build's config check reports (``preflight.compare_configs``).
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER = "paper (RAIN-Merging, ICLR 2026, arXiv 2602.22538: experiments) and the authors' code"
LRM_BASE = "the LRM's own base: DeepSeek-R1-Distill-Qwen-{size} was distilled from Qwen2.5-Math-{size}"


@dataclass(frozen=True)
class Preset:
    """One triple; ``source`` says where the choice of ITM and base comes from."""

    lrm: str
    itm: str
    base: str
    source: str


def _qwen(size: str) -> Preset:
    return Preset(f"deepseek-ai/DeepSeek-R1-Distill-Qwen-{size}", f"Qwen/Qwen2.5-{size}-Instruct",
                  f"Qwen/Qwen2.5-{size}", PAPER)


def _qwen_math(size: str) -> Preset:
    return Preset(f"deepseek-ai/DeepSeek-R1-Distill-Qwen-{size}", f"Qwen/Qwen2.5-Math-{size}-Instruct",
                  f"Qwen/Qwen2.5-Math-{size}", LRM_BASE.format(size=size))


PRESETS: dict[str, Preset] = {
    "qwen1.5b": _qwen("1.5B"),
    "qwen7b": _qwen("7B"),
    "qwen14b": _qwen("14B"),
    "qwen32b": _qwen("32B"),
    "llama8b": Preset("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "meta-llama/Llama-3.1-8B-Instruct",
                      "meta-llama/Llama-3.1-8B", PAPER),
    "qwen1.5b-math": _qwen_math("1.5B"),
    "qwen7b-math": _qwen_math("7B"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def preset_output_name(name: str) -> str:
    """``rain-<preset>``: the adapter's name in the adapter home."""
    get_preset(name)
    return f"rain-{name}"


def format_presets() -> str:
    """``rain build --list-presets``: per preset its name, LRM / ITM / base and source."""
    lines = []
    for name, p in PRESETS.items():
        lines += [f"{name}", f"  lrm:    {p.lrm}", f"  itm:    {p.itm}", f"  base:   {p.base}",
                  f"  source: {p.source}"]
    return "\n".join(lines)
