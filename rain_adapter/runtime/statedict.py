"""State-dict key names of an attached model: the bare model's.

A wrapper module that holds the original as a child (``RainModel.model``, ``RainLinear.base``) would
add that child's name to every key (``model.``, ``.base.``). :func:`bare_keys_hooks` registers a
state-dict post hook that drops it and a load-state-dict pre hook that puts it back, so
``state_dict()`` of an attached model has exactly the bare model's keys and a bare state dict loads
into it (strict). Works at any nesting depth (the hooks get the module's own ``prefix``).
"""

from __future__ import annotations

from functools import partial

from torch import nn


def _strip(child: str, module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``<prefix><child>.<rest>`` -> ``<prefix><rest>``."""
    head = prefix + child + "."
    for key in [k for k in state_dict if k.startswith(head)]:
        state_dict[prefix + key[len(head):]] = state_dict.pop(key)


def _add(child: str, module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``<prefix><rest>`` -> ``<prefix><child>.<rest>`` for every key under ``prefix`` that is not
    one of the wrapper's own entries (its buffers / parameters). Every key: the wrapped model's own
    keys may start with ``<child>.`` too (an HF causal LM's decoder is called ``model``)."""
    head = prefix + child + "."
    own = set(module._buffers) | set(module._parameters)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest.split(".", 1)[0] not in own:
            state_dict[head + rest] = state_dict.pop(key)


def bare_keys_hooks(wrapper: nn.Module, child: str) -> None:
    """Make ``wrapper``'s state dict read and load as if ``wrapper.<child>`` stood in its place."""
    wrapper.register_state_dict_post_hook(partial(_strip, child))
    wrapper.register_load_state_dict_pre_hook(partial(_add, child))


__all__ = ["bare_keys_hooks"]
