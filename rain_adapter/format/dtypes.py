"""The one table of dtype names the library and the CLI accept (``--dtype float32`` …)."""

from __future__ import annotations

import torch

#: name -> torch dtype. Every ``--dtype`` option and every ``dtype="..."`` string argument reads this.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_dtype(dtype: str | torch.dtype | None, *, what: str = "--dtype",
                  error: type[Exception] = ValueError) -> torch.dtype | None:
    """``"bfloat16"`` -> ``torch.bfloat16``; a ``torch.dtype`` or None passes through.

    An unknown name raises ``error`` (callers pass their own error type, e.g. ``ExportError``) with a
    message naming ``what`` and the accepted names.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise error(f"{what} must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


__all__ = ["DTYPES", "resolve_dtype"]
