"""The LRM fingerprint an adapter carries (docs/DESIGN.md §3): per targeted module its weight shape
``[out, in]`` and a hash of three rows, so attaching to another model fails with a clear error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .config import RainConfig
from .errors import AdapterError


def _weight_of(module_or_tensor) -> Tensor:
    if isinstance(module_or_tensor, Tensor):
        return module_or_tensor
    base = getattr(module_or_tensor, "base", None)  # RainLinear wraps the original layer
    return (base if base is not None else module_or_tensor).weight


def weight_hash(weight: Tensor) -> str:
    """Hash of three rows (first, middle, last) of ``weight [out, in]``, rounded to bfloat16.

    Rounding to bfloat16 makes the hash independent of whether the model was loaded in float32,
    float16 or bfloat16 from the same checkpoint.
    """
    w = weight.detach()
    rows = sorted({0, w.shape[0] // 2, w.shape[0] - 1})
    sample = w[rows].to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16)
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]


def compute_fingerprint(model_or_state: nn.Module | dict, module_names: Iterable[str]) -> dict:
    """``{module: {"shape": [out, in], "hash": str}}`` for the targeted weights of the LRM.

    ``model_or_state`` is a model (module paths) or a ``{module name: weight tensor}`` map.
    """
    if isinstance(model_or_state, nn.Module):
        mods = dict(model_or_state.named_modules())
        get = lambda n: _weight_of(mods[n])  # noqa: E731
    else:
        get = lambda n: _weight_of(model_or_state[n])  # noqa: E731
    fp = {}
    for name in module_names:
        w = get(name)
        fp[name] = {"shape": list(w.shape), "hash": weight_hash(w)}
    return fp


def check_fingerprint(config: RainConfig, model: nn.Module, *, strict_hash: bool = True) -> None:
    """Raise :class:`AdapterError` naming the first module whose shape or hash differs."""
    mods = dict(model.named_modules())
    for name, want in config.fingerprint.items():
        if name not in mods:
            raise AdapterError(f"module {name!r}: in the adapter's fingerprint but not in the model")
        w = _weight_of(mods[name])
        if list(w.shape) != list(want["shape"]):
            raise AdapterError(
                f"module {name!r}: model weight has shape {list(w.shape)}, adapter was built for {want['shape']}"
            )
        if strict_hash and want.get("hash") and weight_hash(w) != want["hash"]:
            raise AdapterError(
                f"module {name!r}: weights differ from the model the adapter was built for "
                f"({config.base_model_name_or_path or 'unknown'}); pass check_fingerprint=False to attach anyway"
            )
