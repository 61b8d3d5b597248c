"""accelerate-dispatched models: where a wrapped layer runs and how to read an offloaded weight.

A model loaded with a ``device_map`` carries accelerate hooks (``module._hf_hook``). For a module
whose weights are offloaded (CPU or disk), accelerate gives the module itself an ``AlignDevicesHook``
with ``offload=True``: at rest its parameters are on the ``meta`` device, ``pre_forward`` loads them
from ``hook.weights_map`` (keys are the module's own tensor names, ``"weight"``, ``"bias"``) onto
``hook.execution_device`` and ``post_forward`` puts them back on ``meta``.

:class:`~rain_adapter.runtime.layers.RainLinear` keeps the original layer (with its hook) as
``base`` and calls it, so the hook keeps working unchanged. Nothing here imports accelerate: hooks
are read by attribute (``_hf_hook``, ``offload``, ``execution_device``, ``weights_map``,
``place_submodules``; accelerate ≥ 1.0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..format.store import AdapterError


def _hooks(module: nn.Module) -> list:
    """The hook of ``module`` (a ``SequentialHook`` is opened up into its hooks)."""
    h = getattr(module, "_hf_hook", None)
    if h is None:
        return []
    return list(getattr(h, "hooks", None) or [h])


def offload_hook(module: nn.Module):
    """``module``'s own accelerate hook that offloads its weights (``offload=True``), or None."""
    for h in _hooks(module):
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def is_offloaded(module: nn.Module) -> bool:
    """True when ``module``'s weight is offloaded by its own hook (meta at rest)."""
    return offload_hook(module) is not None


def execution_device(model: nn.Module, name: str, module: nn.Module):
    """The device ``module`` (path ``name`` in ``model``) computes on: its weight's device, or for a
    weight on ``meta`` the ``execution_device`` of its own or the nearest enclosing accelerate hook.
    :class:`AdapterError` naming the module when a meta weight has no hook (an unloaded model)."""
    w = module.weight
    if w.device.type != "meta":
        return w.device
    parts = name.split(".")
    for k in range(len(parts), -1, -1):
        m = model.get_submodule(".".join(parts[:k])) if k else model
        for h in _hooks(m):
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return torch.device(dev)
    raise AdapterError(f"module {name!r}: its weight is on the meta device and no accelerate hook loads it "
                       "(the model was not loaded / dispatched)")


def check_hook_layout(model: nn.Module, name: str, module: nn.Module) -> None:
    """Refuse a layer whose weights an *enclosing* module's hook offloads (``place_submodules=True``,
    as accelerate does for ``preload_module_classes``): that hook looks its tensors up by path, and
    wrapping the layer would rename them. :class:`AdapterError` naming both modules."""
    if module.weight.device.type != "meta" or is_offloaded(module):
        return
    parts = name.split(".")
    for k in range(len(parts) - 1, -1, -1):
        parent = ".".join(parts[:k])
        m = model.get_submodule(parent) if k else model
        for h in _hooks(m):
            if getattr(h, "offload", False) and getattr(h, "place_submodules", False):
                raise AdapterError(f"module {name!r}: its weights are offloaded by the hook of {parent or 'the model'!r} "
                                   "(accelerate preload_module_classes / place_submodules); RAIN attaches to "
                                   "layers offloaded by their own hook (the default device_map dispatch)")


def read_tensor(module: nn.Module, tensor_name: str) -> Tensor | None:
    """``module.<tensor_name>`` with real values: the tensor itself, or for an offloaded (meta) one
    its entry in the hook's ``weights_map`` (read from the CPU copy or from disk, this module only)."""
    t = getattr(module, tensor_name)
    if t is None or t.device.type != "meta":
        return t
    h = offload_hook(module)
    if h is None:
        raise AdapterError(f"{type(module).__name__}.{tensor_name} is on the meta device and no accelerate hook "
                           "holds its values")
    return h.weights_map[tensor_name]


__all__ = ["check_hook_layout", "execution_device", "is_offloaded", "offload_hook", "read_tensor"]
