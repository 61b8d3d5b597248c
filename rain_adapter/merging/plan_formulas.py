"""The cost formulas of ``rain plan`` (docs/DESIGN.md §5.6): FLOPs, bytes and fixed latencies of one
build step, from a :class:`~rain_adapter.merging.plan.ModelShape` and a device profile. Pure
arithmetic; :mod:`~rain_adapter.merging.plan` puts them together into stages (its module docstring
states the model they implement)."""

from __future__ import annotations

from typing import Protocol

from .plan_data import DeviceProfile


class ModelShape(Protocol):
    """What the formulas read of :class:`rain_adapter.merging.plan.ModelShape` (a protocol, so that
    this module does not import ``plan``, which imports it)."""

    layers: int
    heads: int
    head_dim: int
    hidden: int
    intermediate: int

    @property
    def layer_linear(self) -> int: ...


# ---- formulas --------------------------------------------------------------------------------
def forward_flops(m: ModelShape, batches: list[tuple[int, int]], *, layers: int | None = None,
                  extra_linear: int = 0, attn_factor: float = 4.0) -> float:
    """Σ_batches layers·(2·(P_L + extra)·B·T + attn_factor·H·d·B·T²) (padded batches)."""
    layers = m.layers if layers is None else layers
    qd = m.heads * m.head_dim
    return float(sum(layers * (2 * (m.layer_linear + extra_linear) * b * t + attn_factor * qd * b * t * t)
                     for b, t in batches))


def svd_flops(rows: int, cols: int) -> float:
    """Thin SVD with U, Σ, V of a [rows, cols] matrix: 6·m·k² + 20·k³ (k = min, m = max)."""
    k, mx = sorted((rows, cols))
    return 6.0 * mx * k * k + 20.0 * k ** 3


def projection_flops(out: int, inp: int, n: int) -> float:
    """Δ − (ΔB)Bᵀ with m_p = k columns (upper bound) plus ‖ΔXᵀ‖, ‖Δ⊥Xᵀ‖: 4·out·in·(k + n)."""
    return 4.0 * out * inp * (min(n, inp) + n)


def lowrank_flops(out: int, inp: int, rank: int) -> float:
    """``lowrank.compress``: randomized (q = 4, 16 oversamples) when min > 2048 and r+16 < min/2."""
    k = min(out, inp)
    if k > 2048 and rank + 16 < k / 2:
        return 20.0 * out * inp * (rank + 16)
    return svd_flops(out, inp)


def activation_bytes(m: ModelShape, batch: int, seq: int, dbytes: int) -> float:
    """One decoder layer's live activations for [B, T] (attention not materialised as T×T)."""
    return float(batch * seq * (4 * m.hidden + 3 * m.intermediate) * dbytes)


def module_work_bytes(out: int, inp: int, n: int, ckpt_bytes: int) -> float:
    """One module's projection: Δ, its product and Δ⊥ (3·out·in), X and a copy, V, U, ΔXᵀ twice, all
    float32, plus the ITM / base tensors as read (2·out·in·b_ckpt)."""
    k = min(n, inp)
    return 4.0 * (3 * out * inp + 2 * n * inp + inp * k + n * k + 2 * out * n) + 2.0 * out * inp * ckpt_bytes


def causal_attn_factor(batch_size: int) -> float:
    """FLOPs per H·d·T² of a causal attention forward: 2 at batch 1 (no padding mask: SDPA's flash
    kernels skip the blocks above the diagonal, QKᵀ and PV on half of T×T), 4 with a padding mask
    (the masked kernels compute every block)."""
    return 2.0 if batch_size == 1 else 4.0


def call_overhead(p: DeviceProfile, forwards: int, layers: int, *, sequential: bool = False) -> float:
    """Fixed cost of the forward calls: one pass = ``forwards``·(forward + layers·layer latency);
    ``--sequential`` calls each layer on its own (a forward latency per layer and batch)."""
    if sequential:
        return forwards * layers * (p.forward_latency_s + p.layer_latency_s)
    return forwards * (p.forward_latency_s + layers * p.layer_latency_s)


def _rate(p: DeviceProfile, dtype: str) -> float:
    return (p.fp32_tflops if dtype in ("float32", "float64") else p.tflops) * 1e12


def _act(m: ModelShape, batch: int, seq: int, dbytes: int) -> float:
    """Activations with 1.5× allocator slack (freed blocks the heap holds during a forward)."""
    return 1.5 * activation_bytes(m, batch, seq, dbytes)


__all__ = ["forward_flops", "svd_flops", "projection_flops", "lowrank_flops", "activation_bytes", "module_work_bytes", "causal_attn_factor", "call_overhead"]
