"""The LRM fingerprint an adapter carries (docs/DESIGN.md §3): per targeted module its weight shape
``[out, in]`` and a sample of its values, so attaching to another model fails with a clear error.

A record is ``{"shape": [out, in], "scheme": 2, "sample": str}`` (scheme :data:`SCHEME`, the only
one written and read; a record of another scheme, or without ``scheme``, is an error naming the
module and the field). The sample is :data:`SAMPLE_SIZE` weight values at fixed pseudo-random
positions, stored as little-endian float32 in base64. A model matches when every sampled value
agrees within :data:`RTOL` (relative) plus :data:`ATOL` (absolute). The tolerance is what makes one
checkpoint loaded in float32, float16 or bfloat16 match: a bfloat16 load rounds a value by at most
half a bfloat16 step (2⁻⁸ relative), a float16 load by at most 2⁻¹¹ relative or, in float16's
subnormal range, 2⁻²⁵ absolute, so two loads of one checkpoint differ by at most 2⁻⁸ + 2⁻¹¹ ≈ 0.44 %
relative plus ~3e-8. :data:`RTOL` = 2⁻⁸ + 2⁻¹⁰ ≈ 0.49 % leaves a margin above that and still catches
a weight scaled by 1.01 (tests/test_realweights.py) or any other fine-tune. An exact hash of the
values could not do that: float16 rounds a float32 checkpoint first to 10 mantissa bits, and
rounding that again to bfloat16 lands on the other side of a bfloat16 tie for about one value in
sixteen (and float16 flushes values below 6e-5 to subnormals).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .config import FINGERPRINT_SCHEME, RainConfig, fingerprint_scheme_problem
from .errors import AdapterError

#: sampled values per module
SAMPLE_SIZE = 64
#: the scheme written by :func:`compute_fingerprint`, the only one read
SCHEME = FINGERPRINT_SCHEME
#: tolerance of a comparison: one bfloat16 step (2⁻⁷ ≈ 0.0078) with room, plus float16's
#: subnormal spacing (2⁻²⁴ ≈ 6e-8) with room
RTOL = 2.0**-8 + 2.0**-10  # ≈ 0.49 %: above the worst dtype round trip (2⁻⁸ + 2⁻¹¹), below a 1 % change
ATOL = 1e-7
#: a prime stride: sample j sits at flat index (j · stride) mod numel, spread over the whole matrix
_STRIDE = 2_654_435_761


def _weight_of(module_or_tensor) -> Tensor:
    if isinstance(module_or_tensor, Tensor):
        return module_or_tensor
    base = getattr(module_or_tensor, "base", None)  # RainLinear wraps the original layer
    return (base if base is not None else module_or_tensor).weight


def sample_positions(shape: Sequence[int], k: int = SAMPLE_SIZE) -> tuple[list[int], list[int]]:
    """(rows, cols) of the ``k`` sampled entries of a weight of ``shape`` ``[out, in]``; they depend
    only on the shape and ``k``, never on the dtype or the values."""
    cols = int(shape[1])
    numel = int(shape[0]) * cols
    flat = [(j * _STRIDE) % numel for j in range(k)]
    return [i // cols for i in flat], [i % cols for i in flat]


def weight_sample(weight: Tensor, k: int = SAMPLE_SIZE) -> Tensor:
    """``k`` values of ``weight [out, in]`` at fixed positions (:func:`sample_positions`), as
    float64 on the CPU."""
    w = weight.detach()
    rows, cols = sample_positions(w.shape, k)
    rows_t = torch.tensor(rows, device=w.device)
    cols_t = torch.tensor(cols, device=w.device)
    return w[rows_t, cols_t].to("cpu", torch.float64)


def _encode(sample: Tensor) -> str:
    return base64.b64encode(sample.to(torch.float32).numpy().astype("<f4").tobytes()).decode("ascii")


def _decode(text: str, name: str) -> Tensor:
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raw = b"?"
    if not raw or len(raw) % 4:
        raise AdapterError(f"module {name!r}: fingerprint 'sample' is not base64 float32 values")
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float64))


def fingerprint_record(weight: Tensor) -> dict:
    """The record of one weight: ``{"shape", "scheme", "sample"}``."""
    k = min(SAMPLE_SIZE, weight.numel())
    return {"shape": list(weight.shape), "scheme": SCHEME, "sample": _encode(weight_sample(weight, k))}


def fingerprint_record_from_rows(shape: Sequence[int], read_rows: Callable[[list[int]], Tensor],
                                 dtype: torch.dtype) -> dict:
    """The record :func:`fingerprint_record` gives for a weight of ``shape`` loaded as ``dtype``,
    reading only the rows that hold sampled entries: ``read_rows(rows)`` returns those rows
    ``[len(rows), in]`` in any dtype (e.g. as stored in a checkpoint); they are cast to ``dtype``
    first, as loading the model in ``dtype`` would, so the record is the same bytes."""
    shape = [int(x) for x in shape]
    k = min(SAMPLE_SIZE, shape[0] * shape[1])
    rows, cols = sample_positions(shape, k)
    wanted = sorted(set(rows))
    block = read_rows(wanted).to(dtype)
    at = {r: j for j, r in enumerate(wanted)}
    sample = block[torch.tensor([at[r] for r in rows]), torch.tensor(cols)].to("cpu", torch.float64)
    return {"shape": shape, "scheme": SCHEME, "sample": _encode(sample)}


def compute_fingerprint(model_or_state: nn.Module | dict, module_names: Iterable[str]) -> dict:
    """``{module: {"shape": [out, in], "scheme": 2, "sample": str}}`` for the targeted weights.

    ``model_or_state`` is a model (module paths) or a ``{module name: weight tensor}`` map. The same
    checkpoint loaded in float32, float16 or bfloat16 gives records that match each other.
    """
    if isinstance(model_or_state, nn.Module):
        mods = dict(model_or_state.named_modules())
        get = lambda n: _weight_of(mods[n])  # noqa: E731
    else:
        get = lambda n: _weight_of(model_or_state[n])  # noqa: E731
    return {name: fingerprint_record(get(name)) for name in module_names}


def _sample_mismatch(want: dict, w: Tensor, name: str) -> str | None:
    ref = _decode(want.get("sample"), name) if isinstance(want.get("sample"), str) else None
    if ref is None or ref.numel() > min(w.numel(), 16 * SAMPLE_SIZE):
        raise AdapterError(f"module {name!r}: fingerprint record has no valid 'sample'")
    got = weight_sample(w, ref.numel())
    diff = (got - ref).abs()
    tol = RTOL * torch.maximum(got.abs(), ref.abs()) + ATOL
    bad = ~(diff <= tol)  # NaN in the model's weight counts as a mismatch
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        return (f"sampled value {j} is {float(got[j]):.6g}, the adapter's LRM had {float(ref[j]):.6g} "
                f"(tolerance {RTOL:g} relative)")
    return None


def values_mismatch(want: dict, weight: Tensor, name: str) -> str | None:
    """Why the values of ``weight`` do not match module ``name``'s fingerprint record; None if they do.

    The record's scheme (:data:`SCHEME`, else an :class:`AdapterError` naming the module and the
    field), the recorded shape, then the sample within tolerance. A malformed record is an
    :class:`AdapterError` naming the module.
    """
    why = fingerprint_scheme_problem(want)
    if why:
        raise AdapterError(f"module {name!r}: fingerprint record {why}")
    if isinstance(want.get("shape"), list) and list(weight.shape) != list(want["shape"]):
        return f"the weight has shape {list(weight.shape)}, the adapter's LRM had {want['shape']}"
    return _sample_mismatch(want, weight, name)


def check_fingerprint(config: RainConfig, model: nn.Module) -> None:
    """Raise :class:`AdapterError` naming the first module whose shape or values differ (or whose
    record is malformed or of another scheme)."""
    mods = dict(model.named_modules())
    for name, want in config.fingerprint.items():
        if name not in mods:
            raise AdapterError(f"module {name!r}: in the adapter's fingerprint but not in the model")
        if not isinstance(want, dict) or not isinstance(want.get("shape"), list):
            raise AdapterError(f"module {name!r}: malformed fingerprint record {str(want)[:120]}")
        why = fingerprint_scheme_problem(want)
        if why:
            raise AdapterError(f"module {name!r}: fingerprint record {why}")
        w = _weight_of(mods[name])
        if list(w.shape) != list(want["shape"]):
            raise AdapterError(
                f"module {name!r}: model weight has shape {list(w.shape)}, adapter was built for {want['shape']}"
            )
        why = values_mismatch(want, w, name)
        if why is not None:
            raise AdapterError(
                f"module {name!r}: weights differ from the model the adapter was built for "
                f"({config.base_model_name_or_path or 'unknown'}): {why}; pass check_fingerprint=False "
                "to attach anyway"
            )
