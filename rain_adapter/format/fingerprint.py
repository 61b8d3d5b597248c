"""The LRM fingerprint an adapter carries (docs/DESIGN.md §3): per targeted module its weight shape
``[out, in]`` and a sample of its values, so attaching to another model fails with a clear error.

Two record schemes exist:

- **scheme 2** (written now): ``{"shape": [out, in], "scheme": 2, "sample": str}``, the sample being
  :data:`SAMPLE_SIZE` weight values at fixed pseudo-random positions, stored as little-endian
  float32 in base64. A model matches when every sampled value agrees within :data:`RTOL` (relative)
  plus :data:`ATOL` (absolute). The tolerance is what makes one checkpoint loaded in float32, float16
  or bfloat16 match: a bfloat16 load rounds a value by at most half a bfloat16 step (2⁻⁸ relative),
  a float16 load by at most 2⁻¹¹ relative or, in float16's subnormal range, 2⁻²⁵ absolute, so two
  loads of one checkpoint differ by at most 2⁻⁸ + 2⁻¹¹ ≈ 0.44 % relative plus ~3e-8. :data:`RTOL` =
  2⁻⁸ + 2⁻¹⁰ ≈ 0.49 % leaves a margin above that and still catches a weight scaled by 1.01
  (tests/test_realweights.py) or any other fine-tune. An exact hash cannot do that: float16 rounds a float32 checkpoint first to 10 mantissa
  bits, and rounding that again to bfloat16 lands on the other side of a bfloat16 tie for about one
  value in sixteen (and float16 flushes values below 6e-5 to subnormals), so the scheme-1 hash of a
  float16 load never matched.
- **scheme 1** (legacy, adapters written before): ``{"shape", "hash"}``, sha256 of three rows
  rounded to bfloat16. Still checked exactly for float32 / bfloat16 weights; on float16 weights it
  cannot be checked (see above), so only the shape is compared and a :class:`FingerprintWarning`
  says so.
"""

from __future__ import annotations

import base64
import hashlib
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from .config import RainConfig
from .errors import AdapterError

#: sampled values per module (scheme 2)
SAMPLE_SIZE = 64
#: the scheme written by :func:`compute_fingerprint`
SCHEME = 2
#: tolerance of a scheme-2 comparison: one bfloat16 step (2⁻⁷ ≈ 0.0078) with room, plus float16's
#: subnormal spacing (2⁻²⁴ ≈ 6e-8) with room
RTOL = 2.0**-8 + 2.0**-10  # ≈ 0.49 %: above the worst dtype round trip (2⁻⁸ + 2⁻¹¹), below a 1 % change
ATOL = 1e-7
#: a prime stride: sample j sits at flat index (j · stride) mod numel, spread over the whole matrix
_STRIDE = 2_654_435_761


class FingerprintWarning(UserWarning):
    """A fingerprint that could not be fully checked (a scheme-1 record on a float16 model)."""


def _weight_of(module_or_tensor) -> Tensor:
    if isinstance(module_or_tensor, Tensor):
        return module_or_tensor
    base = getattr(module_or_tensor, "base", None)  # RainLinear wraps the original layer
    return (base if base is not None else module_or_tensor).weight


def weight_hash(weight: Tensor) -> str:
    """Scheme 1 (legacy): hash of three rows (first, middle, last) of ``weight``, rounded to bfloat16.

    Matches across float32 and bfloat16 loads of one checkpoint, not float16 ones (module doc);
    kept only to check the records of adapters written before scheme 2.
    """
    w = weight.detach()
    rows = sorted({0, w.shape[0] // 2, w.shape[0] - 1})
    sample = w[rows].to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16)
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]


def weight_sample(weight: Tensor, k: int = SAMPLE_SIZE) -> Tensor:
    """``k`` values of ``weight [out, in]`` at fixed positions, as float64 on the CPU (scheme 2).

    The positions depend only on the shape and ``k``, never on the dtype.
    """
    w = weight.detach()
    cols = int(w.shape[1])
    flat = [(j * _STRIDE) % w.numel() for j in range(k)]
    rows_t = torch.tensor([i // cols for i in flat], device=w.device)
    cols_t = torch.tensor([i % cols for i in flat], device=w.device)
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
    """The scheme-2 record of one weight: ``{"shape", "scheme", "sample"}``."""
    k = min(SAMPLE_SIZE, weight.numel())
    return {"shape": list(weight.shape), "scheme": SCHEME, "sample": _encode(weight_sample(weight, k))}


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

    The recorded shape, then a scheme-2 sample within tolerance or a scheme-1 hash (not checkable
    on float16 weights: a :class:`FingerprintWarning`, and None). A malformed record is an
    :class:`AdapterError` naming the module.
    """
    if isinstance(want.get("shape"), list) and list(weight.shape) != list(want["shape"]):
        return f"the weight has shape {list(weight.shape)}, the adapter's LRM had {want['shape']}"
    if want.get("scheme") == SCHEME:
        return _sample_mismatch(want, weight, name)
    if "scheme" in want:
        raise AdapterError(f"module {name!r}: unknown fingerprint scheme {want['scheme']!r} (this library "
                           f"reads 1 and {SCHEME})")
    if not want.get("hash") or weight_hash(weight) == want["hash"]:
        return None
    if weight.dtype == torch.float16:
        warnings.warn(FingerprintWarning(
            f"module {name!r}: the adapter's fingerprint (scheme 1) cannot be checked on float16 weights; "
            "only the shape was compared (load the model in float32 or bfloat16 to check it)"), stacklevel=3)
        return None
    return "the scheme-1 hash differs"


def check_fingerprint(config: RainConfig, model: nn.Module, *, strict_hash: bool = True) -> None:
    """Raise :class:`AdapterError` naming the first module whose shape or values differ.

    ``strict_hash=False`` compares shapes only.
    """
    mods = dict(model.named_modules())
    for name, want in config.fingerprint.items():
        if name not in mods:
            raise AdapterError(f"module {name!r}: in the adapter's fingerprint but not in the model")
        if not isinstance(want, dict) or not isinstance(want.get("shape"), list):
            raise AdapterError(f"module {name!r}: malformed fingerprint record {str(want)[:120]}")
        w = _weight_of(mods[name])
        if list(w.shape) != list(want["shape"]):
            raise AdapterError(
                f"module {name!r}: model weight has shape {list(w.shape)}, adapter was built for {want['shape']}"
            )
        why = values_mismatch(want, w, name) if strict_hash else None
        if why is not None:
            raise AdapterError(
                f"module {name!r}: weights differ from the model the adapter was built for "
                f"({config.base_model_name_or_path or 'unknown'}): {why}; pass check_fingerprint=False "
                "to attach anyway"
            )
