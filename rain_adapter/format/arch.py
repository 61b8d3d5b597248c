"""Module discovery by architecture.

One small table maps a model family (``config.model_type``) to where its decoder layers live and
which linear sub-modules play which *role* (q, k, v, o, gate, up, down). Everything else in the
library speaks in roles and full module paths (``model.layers.3.self_attn.q_proj``), never in
hard-coded attribute names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

ROLES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class ArchSpec:
    """Where a family keeps its decoder layers and the relative path of each role's linear."""

    layers_path: str
    roles: dict[str, str]


_LLAMA_LIKE = ArchSpec(
    layers_path="model.layers",
    roles={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
)

#: model_type -> layout.  Qwen2 / Qwen3 / Llama / Mistral share the Llama layout.
ARCH_TABLE: dict[str, ArchSpec] = {
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
}

_SUFFIX_TO_ROLE = {path.rsplit(".", 1)[-1]: role for role, path in _LLAMA_LIKE.roles.items()}
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def arch_spec(config) -> ArchSpec:
    """The layout for ``config.model_type``; a clear error for unsupported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCH_TABLE:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r}; supported: {sorted(ARCH_TABLE)} "
            "(add a row to rain_adapter.format.arch.ARCH_TABLE)"
        )
    return ARCH_TABLE[model_type]


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers (``model.model.layers`` for Qwen2 / Llama)."""
    return _get(model, arch_spec(model.config).layers_path)


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def validate_roles(targets: Sequence[str]) -> list[str]:
    bad = [t for t in targets if t not in ROLES]
    if bad:
        raise ValueError(f"unknown target role(s) {bad}; valid roles are {list(ROLES)}")
    return list(dict.fromkeys(targets))


def target_names(config, targets: Sequence[str] | None = None, layers: Sequence[int] | None = None) -> list[str]:
    """Full module paths for ``targets`` (roles) in ``layers``, in layer-major, role order."""
    spec = arch_spec(config)
    roles = validate_roles(targets) if targets is not None else list(ROLES)
    n = config.num_hidden_layers
    layer_ids = list(range(n)) if layers is None else list(layers)
    bad = [i for i in layer_ids if not 0 <= i < n]
    if bad:
        raise ValueError(f"layer index(es) {bad} out of range for a model with {n} layers")
    return [f"{spec.layers_path}.{i}.{spec.roles[r]}" for i in layer_ids for r in roles]


def target_linears(
    model: nn.Module, targets: Sequence[str] | None = None, layers: Sequence[int] | None = None
) -> dict[str, nn.Linear]:
    """``{"model.layers.3.self_attn.q_proj": Linear, ...}`` for the requested roles and layers."""
    out: dict[str, nn.Linear] = {}
    modules = dict(model.named_modules())
    for name in target_names(model.config, targets, layers):
        mod = modules.get(name)
        if mod is None:
            raise ValueError(f"module {name!r} not found in {type(model).__name__} (the model names its "
                             "linears differently from its architecture's usual layout)")
        if not isinstance(mod, nn.Linear):
            # An already-attached RainLinear exposes its wrapped layer as .base.
            base = getattr(mod, "base", None)
            if not isinstance(base, nn.Linear):
                raise ValueError(f"module {name!r} is {type(mod).__name__}, expected nn.Linear (a quantized or "
                                 "otherwise replaced layer cannot be merged)")
        out[name] = mod
    return out


def module_role(name: str) -> str:
    """``"model.layers.3.self_attn.q_proj"`` -> ``"q"``."""
    suffix = name.rsplit(".", 1)[-1]
    if suffix not in _SUFFIX_TO_ROLE:
        raise ValueError(f"cannot tell the role of module {name!r}")
    return _SUFFIX_TO_ROLE[suffix]


def module_layer(name: str) -> int:
    """``"model.layers.3.self_attn.q_proj"`` -> ``3``."""
    m = _LAYER_RE.search(name)
    if m is None:
        raise ValueError(f"cannot tell the layer of module {name!r}")
    return int(m.group(1))


def attention_geometry(config) -> tuple[int, int, int]:
    """``(n_heads, n_kv_heads, head_dim)`` from an HF config."""
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_heads, n_kv, head_dim
