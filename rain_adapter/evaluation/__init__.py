"""Evaluation: instruction checks (built-in IFEval ids, declarative ``spec:*`` checks, Python plug-ins,
one :class:`CheckRegistry`), answer extraction for accuracy, thinking-format checks, λ sweeps, the λ*
search of ``rain tune`` (:class:`TuneOptions`, :func:`tune_attached`, :func:`apply_to_config`) and plots."""

from .answers import EXTRACTORS, ExtractorRegistry, register_extractor, resolve_extractor
from .checks import (
    SUPPORTED_IDS, UnsupportedInstruction, answer_correct, check, split_thinking, strip_thinking, think_format_ok,
)
from .registry import CheckRegistry, default_registry, register_check_module, registry_with
from .scoring import aggregate, score_response
from .specs import SPEC_IDS, SpecError
from .tune import LambdaPoint, TuneError, TuneOptions, TuneResult, search, tune_attached
from .tune_write import apply_to_config, arms_around

__all__ = ["EXTRACTORS", "SPEC_IDS", "SUPPORTED_IDS", "CheckRegistry", "ExtractorRegistry", "LambdaPoint",
           "SpecError", "TuneError", "TuneOptions", "TuneResult", "apply_to_config", "arms_around", "search",
           "tune_attached",
           "UnsupportedInstruction", "aggregate", "answer_correct", "check", "default_registry",
           "register_check_module", "register_extractor", "registry_with", "resolve_extractor", "score_response",
           "split_thinking", "strip_thinking", "think_format_ok"]
