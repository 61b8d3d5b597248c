"""Which kind of linear layer ``attach`` is wrapping: one dispatcher per backend.

Like PEFT's LoRA dispatchers, each backend (plain ``nn.Linear``, torchao-quantized, …) is one
:class:`Dispatcher` in :data:`DISPATCHERS`; :func:`dispatch` returns the first whose ``matches``
accepts the module. A dispatcher says

- ``fused``: whether :class:`~rain_adapter.runtime.layers.RainLinear` may read the weight itself and
  run the fused kernels ``x Wᵀ + b + λ·(x Dᵀ + d_b)`` (Triton / the PyTorch fast path). Otherwise it
  runs the layer as it is (``base(x)``: a quantized matmul, accelerate's offload hook) and adds
  ``λ·(x Dᵀ + d_b)`` beside it in the compute dtype ("beside" path). The base stays as loaded.
- ``dense(module, weight)``: the weight ``W [out, in]`` as a plain tensor of the compute dtype, for
  :meth:`~rain_adapter.runtime.model.RainModel.merge` and the fingerprint check (a quantized weight is
  dequantized; the live layer is never changed).
- ``exact``: whether ``dense`` gives the loaded values exactly (False for a quantized weight: the
  fingerprint check then compares the sampled values with a quantization tolerance, see
  :data:`QUANT_SAMPLE_RTOL`).

Implemented: ``linear`` (plain ``nn.Linear``, fused), ``torchao`` (an ``nn.Linear`` whose weight is a
torchao tensor subclass: ``Int8WeightOnlyConfig``, ``IntxWeightOnlyConfig``, …, also as loaded by
transformers' ``TorchAoConfig``) and ``optimum-quanto`` (``QLinear``, frozen or not), both beside.
Backends that exist but have no dispatcher yet (bitsandbytes, GPTQ, AWQ, HQQ) are
registered as *slots* (``unsupported`` set): :func:`dispatch` raises an
:class:`~rain_adapter.format.store.AdapterError` naming the module and the backend rather than
treating the layer as something it is not. Adding a backend = replacing its slot with a dispatcher
whose ``dense`` dequantizes its weight (and, if its forward is not ``F.linear``, nothing else: the
beside path calls the module itself).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..format.store import AdapterError

#: relative L2 distance ``‖got − ref‖ / ‖ref‖`` of the fingerprint sample up to which a quantized
#: weight counts as the adapter's LRM. int8 per-channel gives ≈ 0.5 %, int4 with groups of 32 ≈ 8 %;
#: an unrelated weight of the same shape gives ≈ 140 %.
QUANT_SAMPLE_RTOL = 0.3


@dataclass(frozen=True)
class Dispatcher:
    """How to wrap one backend's linear layers; see the module doc."""

    backend: str
    matches: Callable[[nn.Module], bool]
    fused: bool = False
    exact: bool = True
    dense: Callable[[nn.Module, Tensor], Tensor] | None = None
    #: a slot without an implementation: why attach refuses the layer
    unsupported: str | None = None


def _module_of(obj: object) -> str:
    return type(obj).__module__ or ""


def _is_plain_tensor(t: Tensor | None) -> bool:
    return t is None or type(t) in (Tensor, nn.Parameter)


def _from_package(*prefixes: str) -> Callable[[nn.Module], bool]:
    def matches(module: nn.Module) -> bool:
        mod = _module_of(module)
        return any(mod == p or mod.startswith(p + ".") for p in prefixes)
    return matches


def _is_torchao_linear(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and w is not None and _module_of(w).startswith("torchao")


def _torchao_dense(module: nn.Module, weight: Tensor) -> Tensor:
    """The dequantized weight ``[out, in]`` of a torchao tensor subclass (``Int8Tensor``,
    ``IntxUnpackedToInt8Tensor``, …) in its logical dtype."""
    w = weight
    deq = getattr(w, "dequantize", None)
    if deq is None:
        raise AdapterError(f"torchao weight {type(w).__name__} has no dequantize(); no RAIN dispatcher for it")
    out = deq()
    return out.to(w.dtype) if out.dtype != w.dtype and w.dtype.is_floating_point else out


def _is_quanto_linear(module: nn.Module) -> bool:
    return _from_package("optimum.quanto")(module) and isinstance(module, nn.Linear) and hasattr(module, "qweight")


def _quanto_dense(module: nn.Module, weight: Tensor) -> Tensor:
    """optimum-quanto's ``QLinear``: its quantized weight (``qweight``, frozen or quantized on the
    fly as its forward does) dequantized."""
    return module.qweight.dequantize().to(module.weight.dtype)


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and _is_plain_tensor(module.weight) and _is_plain_tensor(module.bias)


def _slot(backend: str, packages: tuple[str, ...]) -> Dispatcher:
    return Dispatcher(backend, _from_package(*packages),
                      unsupported=f"{backend} layers have no RAIN dispatcher yet (one Dispatcher in "
                                  "rain_adapter/runtime/dispatchers.py adds them); attach to a float, torchao or "
                                  "optimum-quanto load of the model, or export a merged checkpoint (rain export)")


#: tried in order; the first match wins (slots first: some of their layers subclass nn.Linear)
DISPATCHERS: list[Dispatcher] = [
    _slot("bitsandbytes", ("bitsandbytes",)),
    _slot("GPTQ", ("auto_gptq", "gptqmodel", "optimum.gptq")),
    _slot("AWQ", ("awq", "autoawq")),
    _slot("HQQ", ("hqq",)),
    Dispatcher("optimum-quanto", _is_quanto_linear, fused=False, exact=False, dense=_quanto_dense),
    _slot("optimum-quanto", ("optimum.quanto",)),  # its other layers (QConv*, QLayerNorm) are not linears
    Dispatcher("torchao", _is_torchao_linear, fused=False, exact=False, dense=_torchao_dense),
    Dispatcher("linear", _is_plain_linear, fused=True, exact=True, dense=lambda m, w: w),
]


def dispatch(module: nn.Module, name: str) -> Dispatcher:
    """The dispatcher for ``module`` (at path ``name``); :class:`AdapterError` naming the module and
    the backend when it is a known backend without an implementation, or nothing linear at all."""
    for d in DISPATCHERS:
        if d.matches(module):
            if d.unsupported:
                raise AdapterError(f"module {name!r}: is {type(module).__name__} ({d.backend}): {d.unsupported}")
            return d
    w = getattr(module, "weight", None)
    what = type(module).__name__ + (f" with a {type(w).__name__} weight" if isinstance(module, nn.Linear) else "")
    raise AdapterError(f"module {name!r}: is {what}, expected nn.Linear or a quantized linear of a supported "
                       f"backend ({', '.join(d.backend for d in DISPATCHERS if not d.unsupported)})")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a linear without reading its values (works on meta and quantized weights)."""
    out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if isinstance(out_f, int) and isinstance(in_f, int):
        return out_f, in_f
    shape = tuple(module.weight.shape)
    return int(shape[0]), int(shape[1])


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer's outputs come in (a torchao subclass reports its logical dtype)."""
    return module.weight.dtype


__all__ = ["DISPATCHERS", "Dispatcher", "QUANT_SAMPLE_RTOL", "compute_dtype", "dispatch", "linear_shape"]
