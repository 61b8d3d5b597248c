"""User-supplied regular expressions that cannot hang: the one place a pattern from a user is compiled
and matched (``spec:regex`` checks, the ``regex:<pattern>`` answer extractor; in ``rain sweep``,
``rain tune`` and the server).

A pattern is refused (:class:`RegexRefused`, a ``ValueError``) when it is longer than
:data:`MAX_PATTERN_CHARS`, is not valid Python ``re`` syntax, or would compile to more than
:data:`MAX_PATTERN_SIZE` nodes (a counted repeat such as ``a{100000}`` is unrolled at compile time;
the estimate multiplies the minimum counts of nested repeats). An accepted pattern is compiled with
the ``regex`` package (``re``-compatible syntax, VERSION0) and every search runs with its ``timeout``
(:data:`TIMEOUT_S`) and ``concurrent=True`` (the GIL is released while it matches, so a server's
other threads keep running); a search that runs over the bound raises :class:`RegexTimeout`, which
the scorers turn into an *unscored* check or answer with that reason. A catastrophic pattern such
as ``^(a|aa)+$`` on a long run of ``a`` therefore ends after :data:`TIMEOUT_S` seconds.
"""

from __future__ import annotations

import re
from functools import lru_cache

import regex

try:  # the parser ``re.compile`` uses: exact nesting for the size estimate
    from re import _parser as _sre  # Python 3.11+
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre  # type: ignore[no-redef]

#: longest pattern accepted (characters)
MAX_PATTERN_CHARS = 2000
#: largest compiled size accepted (nodes, counted repeats multiplied out)
MAX_PATTERN_SIZE = 100_000
#: seconds one search may run
TIMEOUT_S = 0.25
#: the flag letters a ``spec:regex`` check may give
FLAG_LETTERS = "ims"

_REPEATS = {op for op in (getattr(_sre, n, None) for n in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"))
            if op is not None}


class RegexRefused(ValueError):
    """A pattern that is not accepted (too long, does not compile, too large once compiled)."""


class RegexTimeout(TimeoutError):
    """A search that ran over :data:`TIMEOUT_S`: the check or answer it was for is unscored."""


def _size(sub, budget: int) -> int:
    """Compiled nodes of a parsed pattern, counted repeats multiplied by their minimum (stops past ``budget``)."""
    total = 0
    for op, av in sub:
        if op in _REPEATS:
            lo, _hi, item = av
            total += max(int(lo), 1) * _size(item, budget)
        else:
            total += 1 + sum(_size(s, budget) for s in _subpatterns(av))
        if total > budget:
            break
    return total


def _subpatterns(av):
    if isinstance(av, _sre.SubPattern):
        yield av
    elif isinstance(av, (tuple, list)):
        for x in av:
            yield from _subpatterns(x)


class BoundedPattern:
    """A compiled, accepted pattern; :meth:`search` is bounded by ``timeout`` seconds."""

    def __init__(self, pattern: str, flags: str = "", timeout: float = TIMEOUT_S):
        self.pattern, self.flags, self.timeout = pattern, flags, timeout
        self._re = regex.compile(pattern, _regex_flags(flags))
        self.groups = self._re.groups

    def search(self, text: str):
        """The first match in ``text`` (a ``regex`` match object) or None; :class:`RegexTimeout` past the bound."""
        try:
            return self._re.search(text, timeout=self.timeout, concurrent=True)
        except TimeoutError:
            raise RegexTimeout(f"the pattern {self.pattern[:80]!r} ran over {self.timeout:g} s on a text of "
                               f"{len(text)} characters (a catastrophic pattern?)") from None


def _regex_flags(flags: str) -> int:
    return sum({"i": regex.IGNORECASE, "m": regex.MULTILINE, "s": regex.DOTALL}[c] for c in set(flags))


def _re_flags(flags: str) -> int:
    return sum({"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}[c] for c in set(flags))


@lru_cache(maxsize=512)
def compile_bounded(pattern: str, flags: str = "") -> BoundedPattern:
    """``pattern`` (with ``flags``, letters of :data:`FLAG_LETTERS`) accepted and compiled, or
    :class:`RegexRefused` saying why."""
    if not isinstance(pattern, str):
        raise RegexRefused(f"a pattern must be a string, got {type(pattern).__name__}")
    if any(c not in FLAG_LETTERS for c in flags):
        raise RegexRefused(f"flags {flags!r}: only the letters {', '.join(FLAG_LETTERS)}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise RegexRefused(f"the pattern has {len(pattern)} characters; at most {MAX_PATTERN_CHARS}")
    try:
        size = _size(_sre.parse(pattern, _re_flags(flags)), MAX_PATTERN_SIZE)
        if size > MAX_PATTERN_SIZE:
            raise RegexRefused(f"too large once compiled (over {MAX_PATTERN_SIZE} nodes: lower the counts of "
                               "its {m,n} repeats)")
        return BoundedPattern(pattern, flags)
    except (re.error, regex.error, OverflowError) as e:
        raise RegexRefused(f"does not compile: {e}") from None
    except RecursionError:
        raise RegexRefused("does not compile: nested too deeply") from None


def bounded_search(pattern: str, text: str, flags: str = ""):
    """``compile_bounded(pattern, flags).search(text)``."""
    return compile_bounded(pattern, flags).search(text)


__all__ = ["BoundedPattern", "FLAG_LETTERS", "MAX_PATTERN_CHARS", "MAX_PATTERN_SIZE", "RegexRefused", "RegexTimeout",
           "TIMEOUT_S", "bounded_search", "compile_bounded"]
