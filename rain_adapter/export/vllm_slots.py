"""The λ grid as LoRA modules for the vLLM engine (``rain serve --engine vllm --lambda-grid …``).

vLLM applies a LoRA at a fixed strength, so every served λ ≠ 0 is one exported PEFT LoRA
(:func:`~rain_adapter.export.peft.export_peft` with ``lam=λ``: ``lora_A = A``, ``lora_B = λ·B``,
scaling 1, so the LoRA adds ``λ (x Aᵀ) Bᵀ`` to each targeted module — the adapter attached at λ).
λ = 0 is the base model itself and takes no slot.

The exports are cached under ``cache_dir()/vllm-loras/<adapter sha256[:16]>/rain-<λ>/`` (one
directory per λ, written atomically by the export), so a restart, or a grid that adds a value,
exports only what is missing. The adapter's identity is the sha256 of every file in its directory
(names and contents), so a rebuilt adapter never reuses an old LoRA.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .peft import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, VLLM_LORA_RANKS, export_peft
from ..format.lambdas import lambda_label
from ..format.paths import cache_dir
from ..format.store import load_adapter, resolve_adapter

#: the cache folder under ``cache_dir()``
CACHE_NAME = "vllm-loras"


@dataclass(frozen=True)
class LoraSlot:
    """One served λ: its LoRA's name (``rain-<λ>``), vLLM's integer id (≥ 1) and directory."""

    lam: float
    name: str
    int_id: int
    path: Path


def adapter_sha256(adapter_dir: str | Path) -> str:
    """sha256 over the adapter directory's files, recursively: relative path and full contents."""
    root = Path(adapter_dir)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _complete(d: Path) -> bool:
    return (d / PEFT_CONFIG_NAME).is_file() and (d / PEFT_WEIGHTS_NAME).is_file()


def lora_slots(adapter: str | Path, grid: tuple[float, ...], *, base_model: str | None = None,
               root: str | Path | None = None) -> tuple[list[LoraSlot], int]:
    """(one :class:`LoraSlot` per λ ≠ 0 of ``grid``, the adapter's largest rank).

    Exports what the cache (``root``, default ``cache_dir()/vllm-loras``) lacks. A dense adapter is
    the export's error (a LoRA needs a factorisation: build the adapter low-rank, or export it with
    ``rain export peft --rank``)."""
    src = resolve_adapter(adapter)
    digest = adapter_sha256(src)[:16]
    base = Path(root) if root is not None else cache_dir() / CACHE_NAME
    cfg, deltas = load_adapter(src)
    dense = [n for n, d in deltas.items() if not d.is_lowrank]
    if dense:
        raise ValueError(f"--adapter {src}: a dense adapter ({len(dense)} dense module(s), e.g. {dense[0]!r}); the "
                         "vLLM engine serves LoRAs: build it low-rank (rain build --storage lowrank --rank R; "
                         "rain fidelity says what a rank costs)")
    max_rank = max(int(d.rank) for d in deltas.values())
    slots: list[LoraSlot] = []
    for lam in grid:
        if lam == 0.0:
            continue
        name = f"rain-{lambda_label(lam)}"
        d = base / digest / name
        if not _complete(d):
            export_peft((cfg, deltas), d, lam=lam, base_model=base_model, overwrite=True, progress=False)
        slots.append(LoraSlot(float(lam), name, len(slots) + 1, d))
    return slots, max_rank


def vllm_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``."""
    for v in VLLM_LORA_RANKS:
        if v >= rank:
            return v
    raise ValueError(f"adapter rank {rank} exceeds vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")


__all__ = ["CACHE_NAME", "LoraSlot", "adapter_sha256", "lora_slots", "vllm_lora_rank"]
