"""Per-module transforms of the task vector for every ``--method`` of ``rain build``.

All methods store D = T(Δ_I) with α = 1 except ``rain`` (Stage 2 folds α in), so every comparison
goes through the same attach / λ path: W(λ) = W_R + λ·D.

* ``task-arithmetic``: D = Δ.
* ``ties`` (Yadav et al. 2023): trim Δ to its top ``density`` fraction of entries by magnitude.
  TIES' sign election and disjoint mean are over several task vectors; with the single task vector
  here the elected sign of every entry is its own sign and the disjoint mean of one value is the
  value, so both steps are the identity and only the trim remains.
* ``dare-ties`` (Yu et al. 2024, then TIES): drop each entry with probability ``drop`` and rescale
  the survivors by 1/(1 − drop) (seeded per module), then the TIES trim.
* ``rain-stage1``: Stage 1 null-space projection (``nullspace.project``), α = 1.
* ``rain``: Stage 1, then Stage 2 coefficients when an instruction calibration set is given.

Bias deltas (``--merge-bias``) are passed through unchanged by every method.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

from ..format.delta import ModuleDelta

METHODS = ("rain", "rain-stage1", "task-arithmetic", "ties", "dare-ties")
PROJECTION_METHODS = ("rain", "rain-stage1")
DEFAULT_DENSITY = 0.2
DEFAULT_DROP = 0.5


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    return method


def needs_projection(method: str) -> bool:
    return check_method(method) in PROJECTION_METHODS


def ties_trim(delta: Tensor, density: float = DEFAULT_DENSITY) -> Tensor:
    """Keep the ``ceil(density·numel)`` largest-magnitude entries of ``delta [out, in]``, zero the rest."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"TIES density must be in (0, 1], got {density}")
    if density >= 1.0:
        return delta.clone()
    k = max(1, int(round(density * delta.numel())))
    flat = delta.abs().flatten()
    thresh = torch.topk(flat.float(), k, largest=True, sorted=False).values.min()
    return torch.where(delta.abs() >= thresh.to(delta.dtype), delta, torch.zeros_like(delta))


def dare(delta: Tensor, drop: float = DEFAULT_DROP, generator: torch.Generator | None = None) -> Tensor:
    """Drop entries with probability ``drop`` and rescale the rest by 1/(1 − drop)."""
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"DARE drop probability must be in [0, 1), got {drop}")
    if drop == 0.0:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator, device="cpu") >= drop
    return torch.where(keep.to(delta.device), delta / (1.0 - drop), torch.zeros_like(delta))


def module_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by (seed, module name): results do not depend on module order."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def transform(method: str, name: str, md: ModuleDelta, *, density: float = DEFAULT_DENSITY,
              drop: float = DEFAULT_DROP, seed: int = 0) -> ModuleDelta:
    """Apply a non-projection method to one module's dense task vector (see module docstring)."""
    check_method(method)
    if md.delta is None:
        raise ValueError(f"module {name!r}: baselines work on dense task vectors")
    d = md.delta
    if method == "task-arithmetic" or method in PROJECTION_METHODS:
        out = d
    elif method == "ties":
        out = ties_trim(d, density)
    else:  # dare-ties
        out = ties_trim(dare(d, drop, module_generator(seed, name)), density)
    return ModuleDelta(delta=out, bias=md.bias)
