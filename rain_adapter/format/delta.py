"""The stored delta of one module: dense ``D [out, in]`` or low-rank ``B [out, r] @ A [r, in]``."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class ModuleDelta:
    """D^k = α^k ⊙ Δ⊥^k for one linear module (α already folded in).

    Exactly one of ``delta`` (dense ``[out, in]``) or the pair ``A [r, in]`` / ``B [out, r]``
    (PEFT's lora_A / lora_B orientation, D ≈ B A) is set. ``bias`` ``[out]`` is an optional bias
    delta, scaled by λ like the weight delta.
    """

    delta: Tensor | None = None
    A: Tensor | None = None
    B: Tensor | None = None
    bias: Tensor | None = None

    def __post_init__(self) -> None:
        dense = self.delta is not None
        low = self.A is not None or self.B is not None
        if dense == low:
            raise ValueError("ModuleDelta needs either a dense `delta` or both `A` and `B`")
        if low:
            if self.A is None or self.B is None:
                raise ValueError("low-rank ModuleDelta needs both A [r, in] and B [out, r]")
            if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
                raise ValueError(
                    f"low-rank shapes do not chain: A {tuple(self.A.shape)} (want [r, in]), "
                    f"B {tuple(self.B.shape)} (want [out, r])"
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
        return None if self.A is None else int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the module."""
        if self.delta is not None:
            return tuple(self.delta.shape)  # type: ignore[return-value]
        return (int(self.B.shape[0]), int(self.A.shape[1]))

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The full ``[out, in]`` delta (``B @ A`` for low-rank), in ``dtype``."""
        if self.delta is not None:
            return self.delta.to(dtype)
        return self.B.to(dtype) @ self.A.to(dtype)

    def tensors(self) -> dict[str, Tensor]:
        """The non-empty tensors by their storage suffix (``rain_delta``, ``rain_A``, ...)."""
        out = {}
        for key, suffix in (("delta", "rain_delta"), ("A", "rain_A"), ("B", "rain_B"), ("bias", "rain_bias")):
            t = getattr(self, key)
            if t is not None:
                out[suffix] = t
        return out

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ModuleDelta":
        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(self, delta=mv(self.delta), A=mv(self.A), B=mv(self.B), bias=mv(self.bias))

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors().values())


SUFFIXES = {"rain_delta": "delta", "rain_A": "A", "rain_B": "B", "rain_bias": "bias"}
