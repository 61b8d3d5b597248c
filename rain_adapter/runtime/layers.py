"""RainLinear: an ``nn.Linear`` plus a stored delta, scaled per batch row at run time.

    y = x Wᵀ + b + s ⊙ (x Dᵀ + d_b)          s = λ of the row (α is folded into D)

λ is per batch row (:meth:`LambdaState.set`) or, for packed continuous-batching inputs
``[1, total_tokens]``, per token (:meth:`LambdaState.set_tokens`: one λ per row of ``x`` flattened
to ``[M, in]``).

The wrapped layer is kept untouched in ``self.base``; the delta lives in non-persistent buffers
(dense ``D [out, in]`` or low-rank ``A [r, in]``, ``B [out, r]``). λ comes from a
:class:`LambdaState` shared by every RainLinear of one model, held as a device tensor so that
changing it never recompiles a graph or invalidates a captured CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..format.delta import ModuleDelta
from ..format.lambdas import check_lambda
from ..kernels import rain_linear


def _as_lambda_tensor(lam: float | Sequence[float] | Tensor) -> Tensor:
    """Validate λ's type and shape (scalar or 1-D) and return it as a float32 CPU tensor ``[n]``.

    Finiteness and the range are the shared policy's job (:func:`~rain_adapter.format.lambdas.check_lambda`).
    """
    if isinstance(lam, bool):
        raise TypeError("λ must be a number or a 1-D sequence of numbers, not a bool")
    if isinstance(lam, (int, float)):
        t = torch.tensor([float(lam)], dtype=torch.float32)
    else:
        t = torch.as_tensor(lam).detach().to("cpu", torch.float32)
        if t.ndim == 0:
            t = t.reshape(1)
        if t.ndim != 1 or t.numel() == 0:
            raise ValueError(f"λ must be a scalar or a non-empty 1-D sequence (one per batch row), got shape {tuple(t.shape)}")
    return t


class LambdaState:
    """The λ of one attached model: ``[1]`` (uniform), ``[n]`` (one per batch row) or, after
    :meth:`set_tokens`, ``[M]`` (one per token row of ``x`` flattened to ``[M, in]``; ``per_token``).

    A uniform λ is updated in place (``copy_``) so a CUDA graph captured once stays right;
    per-device copies are cached so a model split across devices pays one copy per change.
    """

    def __init__(self, lam: float = 1.0, lambda_range: Sequence[float] | None = None) -> None:
        self.lambda_range = tuple(lambda_range) if lambda_range is not None else None
        self._cpu = _as_lambda_tensor(lam)
        # finite only: attach starts from a placeholder λ and then set()s the requested one, which
        # gets the range check
        check_lambda(self._cpu)
        self._per_device: dict[torch.device, Tensor] = {}
        self.all_zero = bool((self._cpu == 0).all())
        self.per_token = False

    def _validated(self, lam: float | Sequence[float] | Tensor) -> Tensor:
        """λ as a tensor, checked by the shared λ policy (finite; outside lambda_range warns)."""
        t = _as_lambda_tensor(lam)
        # stacklevel 4: check_lambda <- _validated <- set <- RainModel.set_lambda -> the user's line
        check_lambda(t, self.lambda_range, stacklevel=4)
        return t

    def set(self, lam: float | Sequence[float] | Tensor) -> None:
        t = self._validated(lam)
        self.per_token = False
        # an inference tensor (set under torch.inference_mode) cannot be updated in place outside it
        frozen = self._cpu.is_inference() and not torch.is_inference_mode_enabled()
        if t.shape == self._cpu.shape and not frozen:
            self._cpu.copy_(t)
            for dev_t in self._per_device.values():
                dev_t.copy_(t, non_blocking=True)
        else:
            self._cpu = t
            self._per_device = {}
        self.all_zero = bool((t == 0).all())

    def set_tokens(self, lam: Sequence[float] | Tensor) -> None:
        """Per-token λ ``[M]``: row ``m`` of every wrapped layer's input flattened to ``[M, in]`` gets
        ``lam[m]`` (packed ``[1, M]`` continuous-batching inputs). Forwards whose ``M`` differs raise."""
        t = self._validated(lam)
        self._cpu = t
        self._per_device = {}
        self.per_token = True
        self.all_zero = bool((t == 0).all())

    @property
    def value(self) -> Tensor:
        """λ as a float32 CPU tensor ``[n]`` (a copy)."""
        return self._cpu.clone()

    def on(self, device: torch.device) -> Tensor:
        if device.type == "cpu":
            return self._cpu
        t = self._per_device.get(device)
        if t is None:
            t = self._per_device[device] = self._cpu.to(device)
        return t


def _capturing(x: Tensor) -> bool:
    """True while ``x``'s CUDA stream is capturing a graph (never for CPU tensors)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def row_scale(lam: Tensor, x_shape: torch.Size) -> Tensor:
    """λ ``[n]`` -> one scale per row of ``x`` flattened to ``[M, in]``.

    ``n == 1`` broadcasts; ``n == batch`` maps row b to batch row b of every token; ``batch = k·n``
    (beams / ``num_return_sequences`` expand each input row k times, contiguously) repeats each λ k
    times, as HF's ``repeat_interleave`` expansion does.
    """
    m = math.prod(x_shape[:-1])
    n = lam.numel()
    if n == 1:
        return lam.expand(m)
    batch = x_shape[0] if len(x_shape) > 1 else m
    if batch != n:
        if batch % n:
            raise ValueError(f"per-row λ has {n} values but the batch has {batch} rows (not a multiple)")
        lam = lam.repeat_interleave(batch // n)
    per_batch = m // batch
    return lam[:, None].expand(batch, per_batch).reshape(m)


def token_scale(lam: Tensor, x_shape: torch.Size, name: str = "") -> Tensor:
    """Per-token λ ``[M]`` -> the scale of ``x`` flattened to ``[M, in]`` (lengths must match)."""
    m = math.prod(x_shape[:-1])
    if lam.numel() != m:
        raise ValueError(f"module {name!r}: per-token λ has {lam.numel()} values but the input has {m} token rows "
                         f"(shape {list(x_shape)})")
    return lam


class RainLinear(nn.Module):
    """``nn.Linear`` wrapper computing ``x Wᵀ + b + λ_row · (x Dᵀ + d_b)``; see the module doc."""

    def __init__(self, base: nn.Linear, delta: ModuleDelta, state: LambdaState, name: str = "") -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"module {name!r}: RainLinear wraps nn.Linear, got {type(base).__name__}")
        out_f, in_f = base.weight.shape
        if tuple(delta.shape) != (out_f, in_f):
            raise ValueError(f"module {name!r}: delta shape {list(delta.shape)} != weight shape {[out_f, in_f]}")
        self.base = base
        self.name = name
        self.state = state
        w = base.weight
        kw = {"device": w.device, "dtype": w.dtype}
        self.register_buffer("rain_delta", None if delta.delta is None else delta.delta.to(**kw).contiguous(), persistent=False)
        self.register_buffer("lora_A", None if delta.lora_A is None else delta.lora_A.to(**kw).contiguous(), persistent=False)
        self.register_buffer("lora_B", None if delta.lora_B is None else delta.lora_B.to(**kw).contiguous(), persistent=False)
        self.register_buffer("rain_bias", None if delta.bias is None else delta.bias.to(**kw), persistent=False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:  # code that inspects `.weight` (dtype / device probes) keeps working
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        # λ = 0 everywhere: exactly the bare layer. Not while a CUDA graph is being captured: the
        # graph would hold the bare path and ignore a later set_lambda (the kernels read λ from
        # the device buffer, so a graph captured through them stays right for any λ)
        if self.state.all_zero and not _capturing(x):
            self.state.on(x.device)  # have λ's device copy ready before any capture (no H2D copy in it)
            return self.base(x)
        lam = self.state.on(x.device)
        scale = token_scale(lam, x.shape, self.name) if self.state.per_token else row_scale(lam, x.shape)
        y = rain_linear(
            x.reshape(-1, x.shape[-1]),
            self.base.weight,
            self.base.bias,
            scale,
            delta=self.rain_delta,
            lora_A=self.lora_A,
            lora_B=self.lora_B,
            bias_delta=self.rain_bias,
        )
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def delta_module(self) -> ModuleDelta:
        return ModuleDelta(delta=self.rain_delta, lora_A=self.lora_A, lora_B=self.lora_B, bias=self.rain_bias)

    def merged_weight(self, lam: float) -> tuple[Tensor, Tensor | None]:
        """``(W + λ D, b + λ d_b)`` in float32 arithmetic, cast back to the weight's dtype."""
        w = self.base.weight
        d = self.delta_module()
        merged = (w.float() + lam * d.dense(torch.float32).to(w.device)).to(w.dtype)
        b = self.base.bias
        if d.bias is not None:
            b0 = b.float() if b is not None else torch.zeros(w.shape[0], device=w.device)
            b = (b0 + lam * d.bias.float()).to(w.dtype)
        return merged, b

    def extra_repr(self) -> str:
        kind = f"lowrank r={self.lora_A.shape[0]}" if self.lora_A is not None else "dense"
        return f"{self.in_features} -> {self.out_features}, delta={kind}, bias_delta={self.rain_bias is not None}"
