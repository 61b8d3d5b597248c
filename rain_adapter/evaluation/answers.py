"""Answer extraction for accuracy: a registry of extractors and one comparison.

An extractor is ``fn(answer_text: str) -> str | None``: it gets the answer part of a response
(thinking stripped) and returns the answer it finds, or None. :func:`answer_correct` compares that
with the row's ``answer``: numerically (exact decimals, relative tolerance :data:`REL_TOL`) when
both sides read as one number, else as strings with case and whitespace normalised.

Built-in extractors (:data:`BUILTIN`):

* ``number`` (the default) — the number inside the last ``\\boxed{…}``, else the first number after
  the last "answer is" / "answer:", else the last number in the text. Numbers may be written
  ``1,234``, ``1 234``, ``1_234``, ``$1,234.00``, ``-5`` or spelled out in English up to the
  billions ("six hundred thirty-two", "six hundred and thirty-two", "minus five"); a lone "one"
  counts only inside a box or after "answer is" (elsewhere it is usually a pronoun).
* ``last_number`` — the last run of digits (commas removed): the behaviour before issue 15.
* ``exact`` — the whole answer text.
* ``choice`` — one letter A–J: "answer is (B)", "answer: B", a bare "B" / "(B)" / "B.", ``\\boxed{B}``,
  else the last "(B)" in the text. The expected answer goes through the same extractor.
* ``regex:<pattern>`` — the first group (or the whole match) of the first match of ``pattern``. The
  pattern is bounded (:mod:`~rain_adapter.evaluation.bounded_regex`): one that is refused is a
  ``ValueError`` when the extractor is resolved, and a search that runs over the time bound raises
  :class:`~rain_adapter.evaluation.bounded_regex.RegexTimeout` (the answer is then unscored).

Other names: extractors registered with :func:`register_extractor`, and ``module:function`` (the
module is imported; ``rain sweep --answer-extract``, or ``"answer_extract"`` on a prompt row).
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from .bounded_regex import BoundedPattern, RegexRefused, compile_bounded

Extractor = Callable[[str], "str | None"]
DEFAULT = "number"
#: relative tolerance of the numeric comparison
REL_TOL = Decimal("1e-9")

_SEP = r"(?:,|_|[ \u00a0\u2009\u202f])"
_NUMERIC = re.compile(r"(?<![\w.])(?P<sign>[-\u2212]\s?)?\$?\s?(?P<int>\d{1,3}(?:" + _SEP + r"\d{3})+(?!\d)|\d+)"
                      r"(?P<frac>\.\d+)?")
_UNITS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine".split())}
_TEENS = {w: i + 10 for i, w in enumerate("ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
                                          "eighteen nineteen".split())}
_TENS = {w: (i + 2) * 10 for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_SCALES = {"thousand": 10 ** 3, "million": 10 ** 6, "billion": 10 ** 9}
_KIND = {**{w: "unit" for w in _UNITS}, **{w: "teen" for w in _TEENS}, **{w: "ten" for w in _TENS},
         "hundred": "hundred", **{w: "scale" for w in _SCALES}}
_VALUE = {**_UNITS, **_TEENS, **_TENS}
#: which kind of number word may follow which (None: the start of a number)
_NEXT = {None: {"unit", "teen", "ten"}, "unit": {"hundred", "scale"}, "teen": {"hundred", "scale"},
         "ten": {"unit", "scale"}, "hundred": {"unit", "teen", "ten", "scale"}, "scale": {"unit", "teen", "ten"}}
_GAP = re.compile(r"[ \t\u00a0-]+")


def _numeric_value(m: re.Match) -> Decimal:
    digits = re.sub(_SEP, "", m.group("int")) + (m.group("frac") or "")
    return -Decimal(digits) if m.group("sign") else Decimal(digits)


def _spelled(text: str, allow_one: bool) -> list[tuple[int, int, Decimal]]:
    """(start, end, value) of each spelled-out English number in ``text``."""
    toks = [(m.start(), m.end(), m.group().lower()) for m in re.finditer(r"[A-Za-z]+", text)]

    def joined(a: int, b: int) -> bool:  # tokens a and b are adjacent (spaces or a hyphen between)
        return _GAP.fullmatch(text[toks[a][1]:toks[b][0]]) is not None

    out, i = [], 0
    while i < len(toks):
        neg = toks[i][2] in ("minus", "negative") and i + 1 < len(toks) and joined(i, i + 1)
        first = i + 1 if neg else i
        if first >= len(toks) or toks[first][2] not in _VALUE:
            i += 1
            continue
        total, current, last, j, top = 0, 0, None, first, None
        while j < len(toks):
            w = toks[j][2]
            if w == "and" and last in ("hundred", "scale") and j + 1 < len(toks) and joined(j - 1, j) \
                    and joined(j, j + 1) and _KIND.get(toks[j + 1][2]) in ("unit", "teen", "ten"):
                j += 1
                continue
            kind = _KIND.get(w)
            if last == "zero" or kind is None or kind not in _NEXT[last] or (j > first and not joined(j - 1, j)):
                break
            if kind == "hundred":
                if not 0 < current < 100:
                    break
                current *= 100
            elif kind == "scale":
                if top is not None and _SCALES[w] >= top:
                    break
                total, current, top = total + current * _SCALES[w], 0, _SCALES[w]
            else:
                current += _VALUE[w]
            last = "zero" if w == "zero" else kind
            j += 1
        end = toks[j - 1][1]
        if toks[j - 1][2] == "and":  # a trailing "and" is not part of the number
            j -= 1
            end = toks[j - 1][1]
        lone_one = j == first + 1 and toks[first][2] == "one" and not neg
        if allow_one or not lone_one:
            out.append((toks[i][0], end, Decimal(-(total + current) if neg else total + current)))
        i = j
    return out


def find_numbers(text: str, *, allow_one: bool = False) -> list[tuple[int, Decimal]]:
    """(position, value) of every number in ``text``, digits or words, in reading order."""
    found = [(m.start(), _numeric_value(m)) for m in _NUMERIC.finditer(text)]
    found += [(s, v) for s, _, v in _spelled(text, allow_one)]
    return sorted(found, key=lambda x: x[0])


def parse_number(text: str) -> Decimal | None:
    """The value of ``text`` when all of it is one number ("1,234", "$5.00", "six hundred"), else None."""
    s = str(text).strip().rstrip(".").strip()
    m = _NUMERIC.fullmatch(s)
    if m:
        return _numeric_value(m)
    runs = _spelled(s, allow_one=True)
    return runs[0][2] if len(runs) == 1 and runs[0][0] == 0 and runs[0][1] == len(s) else None


def _fmt(d: Decimal) -> str:
    return str(int(d)) if d == d.to_integral_value() else format(d.normalize(), "f")


def _boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed{…}`` (nested braces allowed)."""
    out = []
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end():i - 1] if depth == 0 else text[m.end():])
    return out


_ANSWER_IS = re.compile(r"(?i:\banswer)\s*(?:(?i:is|was)\s*:?|[:=])\s*")


def extract_number(text: str) -> str | None:
    """The ``number`` extractor (see the module doc)."""
    tails = [text[m.end():].split("\n", 1)[0] for m in _ANSWER_IS.finditer(text)]
    for seg in [*reversed(_boxed(text)), *reversed(tails)]:
        nums = find_numbers(seg, allow_one=True)
        if nums:
            return _fmt(nums[0][1])
    nums = find_numbers(text)
    return _fmt(nums[-1][1]) if nums else None


def extract_last_number(text: str) -> str | None:
    """The last run of digits (commas removed): what accuracy used before issue 15."""
    nums = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return nums[-1] if nums else None


def extract_exact(text: str) -> str | None:
    return text.strip()


def extract_choice(text: str) -> str | None:
    """One letter A–J (see the module doc)."""
    for pat in (r"(?i:\banswer)\s*(?:(?i:is)\s*:?|:)\s*\(?([A-J])\)?(?![A-Za-z])", r"^\s*\(?([A-J])[).:]?\s*$",
                r"\\boxed\s*\{\s*([A-J])\s*\}", r"\(([A-J])\)"):
        found = re.findall(pat, text)
        if found:
            return found[-1]
    return None


BUILTIN: dict[str, Extractor] = {"number": extract_number, "last_number": extract_last_number,
                                 "exact": extract_exact, "choice": extract_choice}
#: how the expected answer is read before comparing, per extractor (default: as written)
_EXPECTED = {"choice": extract_choice}


class ExtractorRegistry:
    """Extractor name → function: :data:`BUILTIN`, registered ones, ``regex:<pattern>``, ``module:function``."""

    def __init__(self) -> None:
        self._fns: dict[str, Extractor] = dict(BUILTIN)

    def register(self, name: str, fn: Extractor) -> None:
        """Register ``fn`` under ``name`` (Python API: a non-callable is a caller's bug, a TypeError)."""
        if not callable(fn):
            raise TypeError(f"answer extractor {name!r} must be callable")
        self._fns[name] = fn

    def names(self) -> list[str]:
        return sorted(self._fns)

    def resolve(self, name: str | Extractor | None) -> Extractor:
        """The extractor ``name`` stands for (a callable is returned as is).

        ``name`` comes from the user (``--answer-extract``, a prompt row's ``answer_extract``): one
        that is not a string, unknown, or a ``module:function`` that is not a function of an
        importable module is a ``ValueError`` naming it."""
        if callable(name):
            return name
        name = name or DEFAULT
        if not isinstance(name, str):
            raise ValueError(f"answer extractor must be a name (a string), got {type(name).__name__} {name!r:.80}")
        if name in self._fns:
            return self._fns[name]
        if name.startswith("regex:"):
            try:
                pat = compile_bounded(name[len("regex:"):])
            except RegexRefused as e:
                raise ValueError(f"answer extractor {name!r}: the pattern is refused: {e}") from None
            self._fns[name] = fn = _regex_extractor(pat)
            return fn
        m = re.fullmatch(r"([A-Za-z_][\w.]*):([A-Za-z_]\w*)", name)
        if m and m.group(1).split(".")[0] not in sys.stdlib_module_names:
            try:
                fn = getattr(importlib.import_module(m.group(1)), m.group(2), None)
            except ImportError as e:
                raise ValueError(f"answer extractor {name!r}: cannot import {m.group(1)!r}: {e}") from None
            if callable(fn):
                self._fns[name] = fn
                return fn
            raise ValueError(f"answer extractor {name!r}: module {m.group(1)!r} has no function {m.group(2)!r}")
        raise ValueError(f"unknown answer extractor {name!r}; known: {', '.join(self.names())}, "
                         "regex:<pattern>, module:function")


def _regex_extractor(pat: BoundedPattern) -> Extractor:
    def fn(text: str) -> str | None:
        m = pat.search(text)  # RegexTimeout past the bound: the answer is unscored
        return None if m is None else (m.group(1) if pat.groups else m.group(0))
    return fn


EXTRACTORS = ExtractorRegistry()


def register_extractor(name: str, fn: Extractor) -> None:
    """Register an extractor in the process-wide :data:`EXTRACTORS`."""
    EXTRACTORS.register(name, fn)


def resolve_extractor(name: str | Extractor | None = None) -> Extractor:
    """The extractor ``name`` names in :data:`EXTRACTORS` (None: :data:`DEFAULT`)."""
    return EXTRACTORS.resolve(name)


def _norm(s: str) -> str:
    return " ".join(str(s).split()).casefold()


def compare(got: str | None, expected: str | int | float) -> bool:
    """Numeric when both read as one number (relative tolerance :data:`REL_TOL`), else normalised strings."""
    if got is None:
        return False
    a, b = parse_number(got), parse_number(str(expected))
    if a is not None and b is not None:
        try:
            return a == b or abs(a - b) <= REL_TOL * max(abs(a), abs(b))
        except InvalidOperation:
            return False
    return _norm(got) == _norm(str(expected))


def answer_correct(answer_text: str, expected: str | int | float, extract: str | Extractor | None = None) -> bool:
    """Whether the answer ``extract`` finds in ``answer_text`` (thinking already stripped) is ``expected``."""
    got = resolve_extractor(extract)(answer_text)
    want = str(expected).strip()
    norm = _EXPECTED.get(extract or DEFAULT) if isinstance(extract, (str, type(None))) else None
    if norm is not None:
        want = norm(want) or want
    return compare(got, want)


__all__ = ["BUILTIN", "DEFAULT", "EXTRACTORS", "ExtractorRegistry", "REL_TOL", "answer_correct", "compare",
           "extract_choice", "extract_exact", "extract_last_number", "extract_number", "find_numbers",
           "parse_number", "register_extractor", "resolve_extractor"]
