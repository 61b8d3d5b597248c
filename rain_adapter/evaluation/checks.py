"""Verifiable instruction checks (IFEval style), the thinking-format check and answer correctness.

``check(instruction_id, kwargs, response, prompt=None) -> bool`` scores one IFEval instruction on a
response with IFEval's *strict* semantics. When ``lm-eval[ifeval]`` is importable (and
``RAIN_CHECKS=ours`` is not set) its registry is used (``lm_eval.tasks.ifeval.instructions_registry``,
DESIGN §7: offline it needs NLTK ``punkt_tab`` data via ``NLTK_DATA``); otherwise, and for ids it
lacks, our own re-implementation of the same checkers below. ``language:response_language`` needs
``langdetect`` in IFEval; ours only recognises English (ASCII letters) and raises
:class:`UnsupportedInstruction` for other languages, as for unknown ids.

These are the *built-in* ids of the check registry (:mod:`rain_adapter.evaluation.registry`), which
adds declarative ``spec:*`` checks and Python plug-ins; :func:`supported_ids` lists the built-in
ones, ``CheckRegistry.known_ids()`` all. ``follow_instructions``, ``score_response`` and ``aggregate``
live in :mod:`rain_adapter.evaluation.scoring` (which imports this module and the registry; this module
imports neither, so the registry can import it); :func:`answer_correct` uses
:mod:`rain_adapter.evaluation.answers` (default extractor ``number``).

Reasoning models: :func:`split_thinking` removes the ``<think>…</think>`` block before compliance
is scored. :func:`think_format_ok`: exactly one ``</think>``, at most one ``<think>``, non-empty
reasoning before it and a non-empty answer after it.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import answers as _answers

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class UnsupportedInstruction(ValueError):
    """An instruction id (or argument) our checkers cannot score."""


# ----------------------------------------------------------------------------- thinking format

def split_thinking(text: str) -> tuple[str | None, str]:
    """(reasoning, answer). ``reasoning`` is None when there is no ``</think>``.

    The generation prompt of R1-style templates already holds ``<think>``, so a continuation may
    start inside the block; a leading ``<think>`` is dropped too. With several ``</think>`` the
    answer is the text after the last one.
    """
    if THINK_CLOSE not in text:
        return None, text.strip()
    head, _, tail = text.rpartition(THINK_CLOSE)
    head = head.split(THINK_OPEN, 1)[1] if THINK_OPEN in head else head
    return head.strip(), tail.strip()


def strip_thinking(text: str) -> str:
    """The answer part of a response (everything after the last ``</think>``), stripped."""
    return split_thinking(text)[1]


def think_format_ok(text: str) -> bool:
    """Exactly one ``</think>``, at most one ``<think>`` (before it), non-empty reasoning and answer."""
    if text.count(THINK_CLOSE) != 1 or text.count(THINK_OPEN) > 1:
        return False
    if THINK_OPEN in text and text.index(THINK_OPEN) > text.index(THINK_CLOSE):
        return False
    reasoning, answer = split_thinking(text)
    return bool(reasoning) and bool(answer)


def has_thinking(text: str) -> bool:
    """Whether the response contains a thinking marker at all."""
    return THINK_CLOSE in text or THINK_OPEN in text


def answer_correct(response: str, answer: str | int | float, extract: str | Callable | None = None) -> bool:
    """The answer ``extract`` (default ``"number"``, :mod:`~rain_adapter.evaluation.answers`) finds in
    the answer part (after ``</think>``) equals ``answer`` (numeric compare when both are numbers)."""
    return _answers.answer_correct(strip_thinking(response), answer, extract)


# ----------------------------------------------------------------------------- our checkers

def _relation(value: int, relation: str, n: int) -> bool:
    if relation in ("less than",):
        return value < n
    if relation in ("at least",):
        return value >= n
    raise UnsupportedInstruction(f"relation {relation!r} (expected 'less than' or 'at least')")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])|\n+", text.strip())
    return [p for p in parts if p.strip()]


def _title(r: str, **_: Any) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r))


def _postscript(r: str, postscript_marker: str = "P.S.", **_: Any) -> bool:
    marker = postscript_marker.strip()
    low = r.lower()
    if marker == "P.P.S":
        pat = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pat = r"\s*p\.\s?s\..*$"
    else:
        pat = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pat, low, flags=re.MULTILINE))


def _end_checker(r: str, end_phrase: str, **_: Any) -> bool:
    return r.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def _quotation(r: str, **_: Any) -> bool:
    s = r.strip()
    return len(s) > 1 and s[0] == '"' and s[-1] == '"'


def _capital_word_frequency(r: str, capital_frequency: int, capital_relation: str, **_: Any) -> bool:
    n = sum(1 for w in _words(r) if w.isupper())
    return _relation(n, capital_relation, capital_frequency)


def _number_bullets(r: str, num_bullets: int, **_: Any) -> bool:
    n = len(re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE))
    n += len(re.findall(r"^\s*-.*$", r, flags=re.MULTILINE))
    return n == num_bullets


def _json_format(r: str, **_: Any) -> bool:
    s = r.strip().removeprefix("```json").removeprefix("```Json").removeprefix("```JSON")
    s = s.removeprefix("```").removesuffix("```").strip()
    try:
        json.loads(s)
    except ValueError:
        return False
    return True


def _multiple_sections(r: str, section_spliter: str, num_sections: int, **_: Any) -> bool:
    parts = re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", r)
    return len(parts) - 1 >= num_sections


def _highlighted(r: str, num_highlights: int, **_: Any) -> bool:
    n = sum(1 for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip())
    n += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h.removeprefix("**").removesuffix("**").strip())
    return n >= num_highlights


def _constrained(r: str, **_: Any) -> bool:
    opts = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
    return any(o in r.strip() for o in opts)


def _placeholders(r: str, num_placeholders: int, **_: Any) -> bool:
    return len(re.findall(r"\[.*?\]", r)) >= num_placeholders


def _existence(r: str, keywords: Sequence[str], **_: Any) -> bool:
    return all(re.search(re.escape(k), r, flags=re.IGNORECASE) for k in keywords)


def _frequency(r: str, keyword: str, frequency: int, relation: str, **_: Any) -> bool:
    n = len(re.findall(re.escape(keyword), r, flags=re.IGNORECASE))
    return _relation(n, relation, frequency)


def _forbidden(r: str, forbidden_words: Sequence[str], **_: Any) -> bool:
    return not any(re.search(r"\b" + re.escape(w) + r"\b", r, flags=re.IGNORECASE) for w in forbidden_words)


def _letter_frequency(r: str, letter: str, let_frequency: int, let_relation: str, **_: Any) -> bool:
    return _relation(r.lower().count(letter.lower()), let_relation, let_frequency)


def _number_words(r: str, num_words: int, relation: str, **_: Any) -> bool:
    return _relation(len(_words(r)), relation, num_words)


def _number_sentences(r: str, num_sentences: int, relation: str, **_: Any) -> bool:
    return _relation(len(_sentences(r)), relation, num_sentences)


def _number_paragraphs(r: str, num_paragraphs: int, **_: Any) -> bool:
    parts = re.split(r"\s?\*\*\*\s?", r)
    n = len(parts)
    for i, p in enumerate(parts):
        if not p.strip():
            if i == 0 or i == len(parts) - 1:
                n -= 1
            else:
                return False
    return n == num_paragraphs


def _nth_paragraph(r: str, num_paragraphs: int, nth_paragraph: int, first_word: str, **_: Any) -> bool:
    paras = [p for p in re.split(r"\n\n", r) if p.strip()]
    if len(paras) != num_paragraphs or nth_paragraph > len(paras):
        return False
    words = paras[nth_paragraph - 1].strip().split()
    if not words:
        return False
    word = re.sub(r"[^\w]", "", words[0]).lower()
    return word == first_word.lower()


def _repeat_prompt(r: str, prompt_to_repeat: str, **_: Any) -> bool:
    return r.strip().lower().startswith(prompt_to_repeat.strip().lower())


def _two_responses(r: str, **_: Any) -> bool:
    parts = [p.strip() for p in r.split("******")]
    if len(parts) != 2 or not all(parts):
        return False
    return parts[0] != parts[1]


def _response_language(r: str, language: str, **_: Any) -> bool:
    if language != "en":
        raise UnsupportedInstruction(f"language:response_language with language={language!r} needs langdetect")
    letters = [c for c in r if c.isalpha()]
    return bool(letters) and sum(c.isascii() for c in letters) / len(letters) > 0.95


def _english(r: str) -> bool:
    return _response_language(r, "en")


_CHECKS: dict[str, Callable[..., bool]] = {
    "change_case:english_capital": lambda r, **k: r.isupper() and _english(r),
    "change_case:english_lowercase": lambda r, **k: r.islower() and _english(r),
    "change_case:capital_word_frequency": _capital_word_frequency,
    "detectable_format:title": _title,
    "detectable_format:number_bullet_lists": _number_bullets,
    "detectable_format:json_format": _json_format,
    "detectable_format:multiple_sections": _multiple_sections,
    "detectable_format:number_highlighted_sections": _highlighted,
    "detectable_format:constrained_response": _constrained,
    "detectable_content:postscript": _postscript,
    "detectable_content:number_placeholders": _placeholders,
    "startend:quotation": _quotation,
    "startend:end_checker": _end_checker,
    "punctuation:no_comma": lambda r, **k: "," not in r,
    "keywords:existence": _existence,
    "keywords:frequency": _frequency,
    "keywords:forbidden_words": _forbidden,
    "keywords:letter_frequency": _letter_frequency,
    "length_constraints:number_words": _number_words,
    "length_constraints:number_sentences": _number_sentences,
    "length_constraints:number_paragraphs": _number_paragraphs,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph,
    "combination:repeat_prompt": _repeat_prompt,
    "combination:two_responses": _two_responses,
    "language:response_language": _response_language,
}
SUPPORTED_IDS = tuple(sorted(_CHECKS))


def _lm_eval_registry() -> dict | None:
    if os.environ.get("RAIN_CHECKS", "auto") == "ours":
        return None
    return _import_lm_eval_registry()


@functools.lru_cache(maxsize=1)
def _import_lm_eval_registry() -> dict | None:
    """IFEval's own checkers (lm-eval[ifeval]), or None. Tried once per process: a failed import is
    not cached by Python, and retrying it per check cost ~6 ms each (lm-eval without its ifeval
    extra), a third of `rain demo`'s time."""
    try:
        from lm_eval.tasks.ifeval import instructions_registry  # type: ignore
    except Exception:
        return None
    return instructions_registry.INSTRUCTION_DICT


def check(instruction_id: str, kwargs: dict[str, Any] | None, response: str, prompt: str | None = None) -> bool:
    """IFEval strict check of one instruction on ``response`` (thinking is stripped first).

    ``kwargs`` are IFEval's arguments for the id (None / {} when it takes none; ``None``-valued
    entries are dropped like IFEval's evaluation does). Unknown ids and kwargs the checker cannot
    take (missing, unexpected or wrongly typed) raise :class:`UnsupportedInstruction`.
    """
    text = strip_thinking(response)
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None}
    if instruction_id == "combination:repeat_prompt" and "prompt_to_repeat" not in kw and prompt is not None:
        kw["prompt_to_repeat"] = prompt
    reg = _lm_eval_registry()
    if reg is not None and instruction_id in reg:
        inst = reg[instruction_id](instruction_id)
        try:
            inst.build_description(**kw)
        except (TypeError, AttributeError, ValueError) as e:  # same as ours: bad kwargs cannot be scored
            raise UnsupportedInstruction(f"{instruction_id}: bad kwargs {kw}: {e}") from e
        args = inst.get_instruction_args()
        if args and "prompt" in args and prompt is not None:
            inst.build_description(prompt=prompt)
        return bool(text.strip()) and bool(inst.check_following(text))
    fn = _CHECKS.get(instruction_id)
    if fn is None:
        raise UnsupportedInstruction(f"rain_adapter.evaluation.checks: no checker for {instruction_id!r}")
    try:
        return bool(text.strip()) and bool(fn(text, **kw))
    except UnsupportedInstruction:
        raise
    # the response is a string, so these come from the kwargs: missing or unexpected ones (TypeError), a
    # wrongly typed one, e.g. a number for a phrase (AttributeError), or an out-of-range one (IndexError)
    except (TypeError, AttributeError, ValueError, IndexError) as e:
        raise UnsupportedInstruction(f"{instruction_id}: bad kwargs {kw}: {e}") from e


def supported_ids() -> frozenset[str]:
    """The built-in ids :func:`check` can score: ours, plus IFEval's registry when it is in use (the
    check registry's ``known_ids()`` adds ``spec:*`` and plug-ins)."""
    return frozenset(_CHECKS) | frozenset(_lm_eval_registry() or ())


@dataclass(frozen=True)
class InstructionResult:
    """One instruction scored on a response: ``ok`` is None when it could not be scored (``error`` says why)."""

    instruction_id: str
    ok: bool | None
    error: str | None = None

