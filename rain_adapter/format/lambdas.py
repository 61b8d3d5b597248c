"""λ values: the one list grammar (``--lambdas``) and the one range policy (:func:`check_lambda`).

Everything that takes a λ from a user goes through :func:`check_lambda`: ``RainAdapter.attach``,
``RainModel.set_lambda`` / ``set_token_lambda`` / ``lambda_scope`` / ``generate(rain_lambda=…)`` /
``merge`` / ``save_pretrained`` (runtime), ``export_peft`` / ``export_merged`` (export), λ sweeps
(evaluation) and the CLI (``parse_lambdas`` checks every value it produces). So the same λ is
accepted, warned about or refused the same way wherever it is given: a non-number (a bool
included), a non-finite λ or ``|λ| >`` :data:`MAX_ABS_LAMBDA` is an error, a λ outside the
adapter's ``lambda_range`` a :class:`LambdaRangeWarning`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

#: More values than this from one ``--lambdas`` spec is a typo (``0:1:0.0001``), not a sweep.
MAX_LAMBDAS = 10_000
#: The hard bound on a λ: ``|λ|`` above it is an error everywhere (:func:`check_lambda`).
MAX_ABS_LAMBDA = 100.0


class LambdaRangeWarning(UserWarning):
    """A λ outside the adapter's recorded ``lambda_range``: allowed, but not what it was built for."""


def lambda_label(lam: float) -> str:
    """``0.5`` -> ``"0.5"``, ``1.0`` -> ``"1"``: the λ's name (PEFT arm ``rain-<label>``, duplicates)."""
    return f"{float(lam):g}"


def _is_number(x: object) -> bool:
    """A real number that is not a bool (``True`` is not a λ); numpy scalars and one-element tensors count."""
    if isinstance(x, Tensor):
        return x.numel() == 1 and x.dtype != torch.bool and not x.is_complex()
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _values(lams: object, prefix: str, error: type[Exception]) -> Tensor:
    """λ as a flat tensor (a float32 tensor stays as it is: the runtime's hot path), float64 otherwise.

    Anything but a number, a sequence of numbers or a numeric tensor is ``error``: a bool, a
    string, a nested list, a bool or complex tensor.
    """
    if isinstance(lams, Tensor):
        if lams.dtype == torch.bool or lams.is_complex():
            raise error(f"{prefix}λ must be numbers, got a {lams.dtype} tensor")
        return lams.detach().reshape(-1)
    if _is_number(lams):
        return torch.tensor([float(lams)], dtype=torch.float64)
    if isinstance(lams, (str, bytes)) or not isinstance(lams, Iterable):
        raise error(f"{prefix}λ must be a number or a sequence of numbers, got {type(lams).__name__} {lams!r:.60}")
    items = list(lams)
    bad = [x for x in items if not _is_number(x)]
    if bad:
        raise error(f"{prefix}λ must be numbers, got {type(bad[0]).__name__} {bad[0]!r:.60}")
    return torch.tensor([float(x) for x in items], dtype=torch.float64)


def check_lambda(
    lams: float | Iterable[float] | Tensor,
    lambda_range: Sequence[float] | None = None,
    *,
    what: str | None = None,
    error: type[Exception] = ValueError,
    stacklevel: int = 2,
) -> None:
    """The λ policy, one for runtime, export and CLI.

    - **Every λ must be a finite number** with ``|λ| <= MAX_ABS_LAMBDA`` (100): a bool, a string, NaN,
      ±Inf or a bigger λ raise ``error`` (``ValueError`` by default; the export passes
      ``ExportError``, so each library keeps raising its own error type). The bound is far beyond
      any useful strength (adapters are built for about [0, 2]) and keeps ``W + λ·D`` far from
      overflow: 1e38 used to pass with a warning and merge to NaN.
    - **Outside the adapter's ``lambda_range``** (endpoints included, so ``lo <= λ <= hi`` is inside)
      a :class:`LambdaRangeWarning` (a ``UserWarning``) is issued and the λ is accepted. This is
      the strictest rule the existing behaviour allows: ``set_lambda(5.0)`` on a [0, 2] adapter is
      specified to warn (tests/test_attach.py), the export used to print a warning, and the toy
      world's sweeps go past the range on purpose (``rain demo`` sweeps 0..3). Making it an error
      would break those; ignoring it would hide a likely mistake.
    - ``lambda_range=None``: no range check (only the hard rules), e.g. for a ``--lambdas`` list
      parsed before an adapter is loaded.

    ``what`` prefixes the messages (an option, argument or method name). ``stacklevel`` means what
    it means for :func:`warnings.warn` called where ``check_lambda`` is called: 1 names that line,
    the default 2 the line that called the function calling ``check_lambda`` (the user's
    ``export_peft(...)``).
    """
    prefix = f"{what}: " if what else ""
    vals = _values(lams, prefix, error)
    if not bool(torch.isfinite(vals).all()):
        raise error(f"{prefix}λ must be finite, got {vals.tolist()[:8]}")
    if bool((vals.abs() > MAX_ABS_LAMBDA).any()):
        big = [x for x in vals.tolist() if abs(x) > MAX_ABS_LAMBDA]
        raise error(f"{prefix}|λ| must be at most {MAX_ABS_LAMBDA:g}, got {big[:8]}")
    if lambda_range is None:
        return
    lo, hi = (float(x) for x in lambda_range)
    outside = (vals < lo) | (vals > hi)
    if bool(outside.any()):
        bad = sorted({round(float(x), 10) for x in vals[outside].tolist()})
        warnings.warn(LambdaRangeWarning(f"{prefix}λ {bad} outside the adapter's lambda_range [{lo:g}, {hi:g}]"),
                      stacklevel=stacklevel + 1)


def _number(text: str, spec: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} {spec!r}: {text.strip()!r} is not a number") from None


def _expand_range(item: str, spec: str, what: str) -> list[float]:
    """``start:stop:step`` -> ``[start, start + step, …]`` up to and including ``stop``."""
    parts = item.split(":")
    if len(parts) != 3:
        raise ValueError(f"{what} {spec!r}: a range is start:stop:step, got {item.strip()!r}")
    start, stop, step = (_number(p, spec, what) for p in parts)
    if not all(math.isfinite(x) for x in (start, stop, step)):
        raise ValueError(f"{what} {spec!r}: λ must be finite, got {item.strip()!r}")
    if step <= 0 or stop < start:
        raise ValueError(f"{what} {spec!r}: a range needs step > 0 and stop >= start, got {item.strip()!r}")
    # the epsilon keeps `stop` when (stop - start) / step lands a rounding error below an integer
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    if n > MAX_LAMBDAS:
        raise ValueError(f"{what} {spec!r}: {item.strip()!r} gives {n} values (at most {MAX_LAMBDAS})")
    return [round(start + i * step, 10) for i in range(n)]


def parse_lambdas(spec: str, *, what: str = "--lambdas") -> list[float]:
    """The λ-list grammar: comma-separated items, each a number or a ``start:stop:step`` range.

    ``"0:1.5:0.25"`` -> ``[0, 0.25, …, 1.5]`` (stop included); ``"0, 0.5,1"`` -> ``[0, 0.5, 1]``;
    ``"0:1:0.5,2"`` -> ``[0, 0.5, 1, 2]``. Empty items are skipped (``"0.5,1,"``). Raises
    ``ValueError`` naming ``what`` for: no values, a non-number, a range without three parts or with
    ``step <= 0`` / ``stop < start``, more than :data:`MAX_LAMBDAS` values, duplicates (equal
    :func:`lambda_label`, i.e. the same arm name), and non-finite values or ``|λ| >``
    :data:`MAX_ABS_LAMBDA` (:func:`check_lambda`).
    """
    vals: list[float] = []
    for item in spec.split(","):
        if not item.strip():
            continue
        vals += _expand_range(item, spec, what) if ":" in item else [_number(item, spec, what)]
    if not vals:
        raise ValueError(f"{what} {spec!r}: no values given")
    if len(vals) > MAX_LAMBDAS:
        raise ValueError(f"{what} {spec!r}: {len(vals)} values (at most {MAX_LAMBDAS})")
    check_lambda(vals, what=f"{what} {spec!r}")
    dup = sorted(label for label, n in Counter(lambda_label(v) for v in vals).items() if n > 1)
    if dup:
        raise ValueError(f"{what} {spec!r}: duplicate values {', '.join(dup)}")
    return vals


__all__ = ["MAX_ABS_LAMBDA", "MAX_LAMBDAS", "LambdaRangeWarning", "check_lambda", "lambda_label", "parse_lambdas"]
