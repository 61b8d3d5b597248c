"""The ``--method`` registry of ``rain build`` (in the style of mergekit's merge methods).

Each method is one frozen :class:`MergeMethod` that declares what it is and what it needs: its name,
a one-line description, the :class:`~rain_adapter.merging.options.BuildOptions` fields it reads
(``params``), whether it runs Stage 1 projection and Stage 2, and its per-module transform. The
pipeline reads these declarations instead of branching on the name; ``REGISTRY`` / ``get_method`` /
``method_names`` are the lookup.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..format.delta import ModuleDelta

DEFAULT_DENSITY = 0.2
DEFAULT_DROP = 0.5


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


#: A per-module transform: (module name, Δ_I of that module, the method's declared params) → D.
ModuleTransform = Callable[[str, ModuleDelta, Mapping[str, Any]], ModuleDelta]


@dataclass(frozen=True)
class MergeMethod:
    """One ``--method``: its declarations, read by the pipeline (see the module docstring).

    ``params``: the BuildOptions fields the method reads; for the transform methods exactly those
    are recorded in ``config.stage1``. ``projects``: D = Stage 1 projection of Δ (needs the LRM's
    features at the thinking positions, so the pipeline applies ``nullspace.project``; ``transform``
    is then None). ``stage2``: per-head α when an instruction calibration set is given; when it is
    not run the adapter is recorded as ``without_stage2``.
    """

    name: str
    description: str
    params: tuple[str, ...] = ()
    projects: bool = False
    stage2: bool = False
    transform: ModuleTransform | None = None
    without_stage2: str | None = None

    def apply(self, name: str, md: ModuleDelta, options: Mapping[str, Any]) -> ModuleDelta:
        """D = T(Δ) for one module's dense task vector ``md.delta [out, in]``; the bias is passed
        through. ``options``: any mapping holding (at least) the declared ``params``."""
        if self.transform is None:
            raise ValueError(f"method {self.name!r} has no per-module transform (it projects with features)")
        if md.delta is None:
            raise ValueError(f"module {name!r}: baselines work on dense task vectors")
        return self.transform(name, md, {p: options[p] for p in self.params})


def _identity(name: str, md: ModuleDelta, p: Mapping[str, Any]) -> ModuleDelta:
    return ModuleDelta(delta=md.delta, bias=md.bias)


def _ties(name: str, md: ModuleDelta, p: Mapping[str, Any]) -> ModuleDelta:
    return ModuleDelta(delta=ties_trim(md.delta, p["density"]), bias=md.bias)


def _dare_ties(name: str, md: ModuleDelta, p: Mapping[str, Any]) -> ModuleDelta:
    dropped = dare(md.delta, p["drop"], module_generator(p["seed"], name))
    return ModuleDelta(delta=ties_trim(dropped, p["density"]), bias=md.bias)


#: Stage 1 options (reasoning calibration, feature capture, projection).
STAGE1_PARAMS = ("reasoning_calib", "radius", "projection", "project_layers", "protect_energy", "ridge",
                 "svd_dtype", "max_samples", "min_samples", "max_seq_len", "batch_size", "sequential", "seed")
#: Stage 2 options (instruction calibration, α).
STAGE2_PARAMS = ("instruction_calib", "no_stage2", "rho", "alpha_grad", "alpha_norm", "alpha_max", "o_alpha",
                 "stage2_max_samples", "stage2_max_seq_len")

#: Name → method, in the order ``rain build --help`` lists them.
REGISTRY: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("rain", "Stage 1 null-space projection, then Stage 2 per-head α (with --instruction-calib)",
                STAGE1_PARAMS + STAGE2_PARAMS, projects=True, stage2=True, without_stage2="rain-stage1"),
    MergeMethod("rain-stage1", "Stage 1 null-space projection only (α = 1)", STAGE1_PARAMS, projects=True),
    MergeMethod("task-arithmetic", "the plain task vector, D = Δ", (), transform=_identity),
    MergeMethod("ties", "TIES trim: keep the top --density fraction of |Δ|", ("density",), transform=_ties),
    MergeMethod("dare-ties", "DARE (drop with p = --drop, rescale 1/(1 − p), seeded) then the TIES trim",
                ("density", "drop", "seed"), transform=_dare_ties),
)}


def method_names() -> list[str]:
    """The registered method names, in registry order."""
    return list(REGISTRY)


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; an unknown name is a ValueError that lists the valid ones."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; choose one of {method_names()}") from None
