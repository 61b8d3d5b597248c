"""Evaluation: IFEval-style instruction checks, thinking-format checks, λ sweeps and plots."""

from .checks import (
    SUPPORTED_IDS, UnsupportedInstruction, aggregate, answer_correct, check, score_response, split_thinking,
    strip_thinking, think_format_ok,
)

__all__ = ["SUPPORTED_IDS", "UnsupportedInstruction", "aggregate", "answer_correct", "check", "score_response",
           "split_thinking", "strip_thinking", "think_format_ok"]
