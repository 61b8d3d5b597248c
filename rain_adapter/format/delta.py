"""The stored delta of one module: dense ``D [out, in]`` or low-rank ``lora_B [out, r] @ lora_A [r, in]``.

The low-rank factors carry PEFT's names and orientation everywhere: in code, in adapter files
(:data:`SUFFIXES`, the tensor keys of format version 2) and in PEFT exports (docs/DESIGN.md §2, §3).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class ModuleDelta:
    """D^k = α^k ⊙ Δ⊥^k for one linear module (α already folded in).

    Exactly one of ``delta`` (dense ``[out, in]``) or the pair ``lora_A [r, in]`` / ``lora_B [out, r]``
    (D = lora_B @ lora_A, as in PEFT) is set. ``bias`` ``[out]`` is an optional bias
    delta, scaled by λ like the weight delta.
    """

    delta: Tensor | None = None
    lora_A: Tensor | None = None
    lora_B: Tensor | None = None
    bias: Tensor | None = None

    def __post_init__(self) -> None:
        dense = self.delta is not None
        low = self.lora_A is not None or self.lora_B is not None
        if dense == low:
            raise ValueError("ModuleDelta needs either a dense `delta` or both `lora_A` and `lora_B`")
        if low:
            if self.lora_A is None or self.lora_B is None:
                raise ValueError("low-rank ModuleDelta needs both lora_A [r, in] and lora_B [out, r]")
            if self.lora_A.ndim != 2 or self.lora_B.ndim != 2 or self.lora_A.shape[0] != self.lora_B.shape[1]:
                raise ValueError(
                    f"low-rank shapes do not chain: lora_A {tuple(self.lora_A.shape)} (want [r, in]), "
                    f"lora_B {tuple(self.lora_B.shape)} (want [out, r])"
                )
        elif self.delta.ndim != 2:
            raise ValueError(f"dense delta must be 2-D [out, in], got {tuple(self.delta.shape)}")
        if self.bias is not None and (self.bias.ndim != 1 or self.bias.shape[0] != self.shape[0]):
            raise ValueError(f"bias delta shape {tuple(self.bias.shape)} does not match out={self.shape[0]}")

    @property
    def is_lowrank(self) -> bool:
        return self.delta is None

    @property
    def rank(self) -> int | None:
        return None if self.lora_A is None else int(self.lora_A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the module."""
        if self.delta is not None:
            return tuple(self.delta.shape)  # type: ignore[return-value]
        return (int(self.lora_B.shape[0]), int(self.lora_A.shape[1]))

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The full ``[out, in]`` delta (``lora_B @ lora_A`` for low-rank), in ``dtype``."""
        if self.delta is not None:
            return self.delta.to(dtype)
        return self.lora_B.to(dtype) @ self.lora_A.to(dtype)

    def tensors(self) -> dict[str, Tensor]:
        """The non-empty tensors by their storage suffix (``rain_delta``, ``lora_A``, ...: :data:`SUFFIXES`)."""
        return {suffix: getattr(self, field) for suffix, field in SUFFIXES.items() if getattr(self, field) is not None}

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ModuleDelta":
        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(self, delta=mv(self.delta), lora_A=mv(self.lora_A), lora_B=mv(self.lora_B), bias=mv(self.bias))

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors().values())


#: tensor-key suffix -> ModuleDelta field: the keys an adapter file holds (format version 2), the
#: only ones written and read
SUFFIXES = {"rain_delta": "delta", "lora_A": "lora_A", "lora_B": "lora_B", "rain_bias": "bias"}
