"""RainLinear: an ``nn.Linear`` plus a stored delta, scaled per batch row at run time.

    y = x Wᵀ + b + s ⊙ (x Dᵀ + d_b)          s = λ of the row (α is folded into D)

λ is per batch row (:meth:`LambdaState.set`) or, for packed continuous-batching inputs
``[1, total_tokens]``, per token (:meth:`LambdaState.set_tokens`: one λ per row of ``x`` flattened
to ``[M, in]``).

The wrapped layer is kept untouched in ``self.base`` (state-dict hooks keep the bare layer's key
names, ``<module>.weight``); the delta lives in non-persistent buffers (dense ``D [out, in]`` or
low-rank ``A [r, in]``, ``B [out, r]``) on the layer's execution device, in its compute dtype.
Two forwards (:attr:`RainLinear.path`, chosen by the layer's
:class:`~rain_adapter.runtime.dispatchers.Dispatcher`): "fused", where the kernels read ``W``
themselves (plain ``nn.Linear``), and "beside", ``base(x) + s ⊙ Δ(x)`` for layers that must run as
loaded (quantized weights, accelerate-offloaded weights on ``meta`` behind their hook). λ comes from a
:class:`LambdaState` shared by every RainLinear of one model, held as a device tensor so that
changing it never recompiles a graph or invalidates a captured CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..format.delta import ModuleDelta
from ..format.arch import module_role
from ..format.lambdas import check_lambda
from ..format.store import AdapterError
from .dispatchers import Dispatcher, compute_dtype, dispatch, linear_shape
from .offload import is_offloaded, read_tensor
from .statedict import bare_keys_hooks
from rain_kernels import lowrank_shrink, rain_linear, rain_linear_torch_fast, use_triton

#: input dtypes of the eager fast path (the delta is added in x's dtype: float32 accumulate at least)
_FAST_DTYPES = (torch.float32, torch.float64)
#: roles that one attention / MLP forward feeds the same input tensor (HF Qwen2 / Llama / Mistral)
SHARED_INPUT_ROLES: tuple[frozenset[str], ...] = (frozenset({"q", "k", "v"}), frozenset({"gate", "up"}))
#: rows at or below which the Triton path decodes (fused shrink in the tile kernel: no grouping)
_TRITON_DECODE_M = 16


def _as_lambda_tensor(lam: float | Sequence[float] | Tensor, what: str = "λ") -> Tensor:
    """Validate λ's shape (scalar or 1-D, non-empty) and return it as a float32 CPU tensor ``[n]``.

    Types (a bool is not a λ), finiteness, the bound and the range are the shared policy's job
    (:func:`~rain_adapter.format.lambdas.check_lambda`), run before this.
    """
    if isinstance(lam, (int, float)) and not isinstance(lam, bool):
        return torch.tensor([float(lam)], dtype=torch.float32)
    t = torch.as_tensor(lam).detach().to("cpu", torch.float32)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"{what}: λ must be a scalar or a non-empty 1-D sequence (one per batch row), "
                         f"got shape {tuple(t.shape)}")
    return t


class LambdaState:
    """The λ of one attached model: ``[1]`` (uniform), ``[n]`` (one per batch row) or, after
    :meth:`set_tokens`, ``[M]`` (one per token row of ``x`` flattened to ``[M, in]``; ``per_token``).

    A uniform λ is updated in place (``copy_``) so a CUDA graph captured once stays right;
    per-device copies are cached so a model split across devices pays one copy per change. What
    the forwards derive from λ (the float32 row scale ``[M]`` of the kernels, the fast path's column
    ``[M, 1]`` and λ ≠ 0 mask) is cached per (device, dtype, leading input shape) and dropped by
    every :meth:`set` / :meth:`set_tokens`, so an unchanged λ costs no allocation, copy or host
    read per forward; ``scalar`` is the host float of a uniform λ (``None`` otherwise).
    """

    def __init__(self, lam: float = 1.0, lambda_range: Sequence[float] | None = None) -> None:
        self.lambda_range = tuple(lambda_range) if lambda_range is not None else None
        # the hard rules only: attach starts from a placeholder λ and then set()s the requested one,
        # which gets the range check
        check_lambda(lam, what="initial λ")
        self._cpu = _as_lambda_tensor(lam)
        self._per_device: dict[torch.device, Tensor] = {}
        self.per_token = False
        self._flags(self._cpu)

    def _validated(self, lam: float | Sequence[float] | Tensor, what: str) -> Tensor:
        """λ as a float32 tensor, checked by the shared λ policy before anything changes: a bool,
        a non-number, a non-finite λ or ``|λ| > 100`` raise ``ValueError`` naming ``what``; a bad
        shape too; outside lambda_range warns."""
        check_lambda(lam, what=what)
        t = _as_lambda_tensor(lam, what)
        # stacklevel 4: check_lambda <- _validated <- set <- RainModel.set_lambda -> the user's line
        check_lambda(t, self.lambda_range, what=what, stacklevel=4)
        return t

    def set(self, lam: float | Sequence[float] | Tensor, what: str = "λ") -> None:
        """Set λ (``[1]`` or one per batch row); a refused λ leaves the state as it was."""
        t = self._validated(lam, what)
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
        self._flags(t)

    def _flags(self, t: Tensor) -> None:
        """Host-side facts about the new λ ``t``, read once per change (never per forward)."""
        self.all_zero = bool((t == 0).all())
        self.any_zero = bool((t == 0).any())
        self.scalar = float(t[0]) if t.numel() == 1 and not self.per_token else None
        self._derived: dict[tuple, tuple] = {}  # (kind, device, dtype, lead shape) -> derived λ

    def set_tokens(self, lam: Sequence[float] | Tensor, what: str = "λ") -> None:
        """Per-token λ ``[M]``: row ``m`` of every wrapped layer's input flattened to ``[M, in]`` gets
        ``lam[m]`` (packed ``[1, M]`` continuous-batching inputs). Forwards whose ``M`` differs raise."""
        t = self._validated(lam, what)
        self._cpu = t
        self._per_device = {}
        self.per_token = True
        self._flags(t)

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

    def _rows(self, x: Tensor, name: str) -> Tensor:
        """The live λ expanded to one float32 scale per row of ``x`` flattened to ``[M, in]``."""
        lam = self.on(x.device)
        return token_scale(lam, x.shape, name) if self.per_token else row_scale(lam, x.shape)

    def scale(self, x: Tensor, name: str = "", *, cached: bool = True) -> Tensor:
        """float32 ``[M]`` (or ``[1]``-backed) row scale of the kernels for input ``x``.

        ``cached=False`` (CUDA-graph capture, ``torch.compile``) derives it from the live device λ
        inside the call, so a captured graph reads the value a later same-shape :meth:`set` writes."""
        if not cached:
            return self._rows(x, name)
        key = ("scale", x.device, x.shape[:-1])
        hit = self._derived.get(key)
        if hit is None:
            hit = self._derived[key] = (self._rows(x, name),)
        return hit[0]

    def fast_args(self, x: Tensor, name: str = "") -> tuple[float | Tensor, Tensor | None]:
        """``(lam, keep)`` of :func:`~rain_kernels.rain_linear_torch_fast` for ``x``: a uniform
        λ → ``(λ as a host float, None)``; otherwise ``(col [M, 1] in x's dtype, keep)`` with ``keep`` =
        (λ ≠ 0) ``[M, 1]`` only when some λ is 0. Cached (the same objects) until λ changes."""
        if self.scalar is not None:
            return self.scalar, None
        key = ("fast", x.device, x.dtype, x.shape[:-1])
        hit = self._derived.get(key)
        if hit is None:
            col = self._rows(x, name).to(x.dtype).reshape(-1, 1)
            hit = self._derived[key] = (col, (col != 0) if self.any_zero else None)
        return hit


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

    def __init__(self, base: nn.Module, delta: ModuleDelta, state: LambdaState, name: str = "", *,
                 dispatcher: Dispatcher | None = None, device: torch.device | str | None = None) -> None:
        """``base``: a linear layer one of :data:`~rain_adapter.runtime.dispatchers.DISPATCHERS` accepts
        (``dispatcher``: the one :func:`~rain_adapter.runtime.dispatchers.dispatch` picks, by default).
        The delta goes to ``device`` (default: the weight's device; give the execution device for a
        weight offloaded to ``meta``) in the layer's compute dtype. Reads the weight's shape only."""
        super().__init__()
        if dispatcher is None:
            try:
                dispatcher = dispatch(base, name)
            except AdapterError as e:
                raise TypeError(str(e)) from None
        out_f, in_f = linear_shape(base)
        if tuple(delta.shape) != (out_f, in_f):
            raise ValueError(f"module {name!r}: delta shape {list(delta.shape)} != weight shape {[out_f, in_f]}")
        self.base = base
        self.name = name
        self.state = state
        self.dispatcher = dispatcher
        w = base.weight
        dev = torch.device(device) if device is not None else w.device
        if dev.type == "meta":
            raise ValueError(f"module {name!r}: the weight is on the meta device; pass the execution device")
        kw = {"device": dev, "dtype": compute_dtype(base)}
        # fused: the kernels read W themselves (plain nn.Linear, weights resident); otherwise the
        # "beside" path runs base(x) as loaded (quantized matmul, accelerate's offload hook) + λ·Δ
        self._fused = dispatcher.fused and not is_offloaded(base)
        self.register_buffer("rain_delta", None if delta.delta is None else delta.delta.to(**kw).contiguous(), persistent=False)
        self.register_buffer("lora_A", None if delta.lora_A is None else delta.lora_A.to(**kw).contiguous(), persistent=False)
        # lora_B [out, r] is kept as the transpose of a contiguous [r, out]: the fast path's expand
        # reads Bᵀ row-major (a plain GEMM, ~30% cheaper at decode); every other reader uses strides
        self.register_buffer("lora_B", None if delta.lora_B is None else delta.lora_B.to(**kw).t().contiguous().t(),
                             persistent=False)
        self.register_buffer("rain_bias", None if delta.bias is None else delta.bias.to(**kw), persistent=False)
        # the state dict keeps the bare model's key names: "<module>.weight", not "<module>.base.weight"
        bare_keys_hooks(self, "base")
        # set by ShrinkGroup: the group whose stacked lora_A this layer's shrink is a column slice of
        self.group: ShrinkGroup | None = None
        self.group_index = 0

    @property
    def in_features(self) -> int:
        return linear_shape(self.base)[1]

    @property
    def out_features(self) -> int:
        return linear_shape(self.base)[0]

    @property
    def path(self) -> str:
        """Which forward this layer runs: ``"fused"`` (the kernels read W: Triton on CUDA, the PyTorch
        fast path elsewhere) or ``"beside"`` (``base(x)`` as loaded + λ·Δ in PyTorch: quantized and
        offloaded bases)."""
        return "fused" if self._fused else "beside"

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
        st = self.state
        capturing = _capturing(x)
        if st.all_zero and not capturing:
            st.on(x.device)  # have λ's device copy ready before any capture (no H2D copy in it)
            return self.base(x)
        eager = not capturing and not torch.compiler.is_compiling()
        buf = self._buffers  # hot path: plain dict reads instead of nn.Module.__getattr__
        A, B, D, bd = buf["lora_A"], buf["lora_B"], buf["rain_delta"], buf["rain_bias"]
        base = self._modules["base"]
        W, b = base.weight, base.bias
        if not self._fused or x.device != W.device:
            return self._beside(x, base, A, B, D, bd, eager)
        x2d = x.reshape(-1, x.shape[-1])
        triton = use_triton(x2d)
        g = self.group
        if eager and not triton and x.dtype in _FAST_DTYPES and W.dtype == x.dtype:
            lam, keep = st.fast_args(x, self.name)
            # a group scales its stacked t by λ once for all members
            t = None if A is None else (lowrank_shrink(x2d, A) if g is None else g.take(self.group_index, x, x2d, lam))
            y = rain_linear_torch_fast(x2d, W, b, lam=lam, keep=keep, delta=D, shrunk=t, scaled=g is not None,
                                       lora_B=B, bias_delta=bd)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        t = None
        # the grouped shrink pays where the shrink is a launch / call of its own: the PyTorch path,
        # and Triton's prefill tiles (at M ≤ 16 the fused Triton variant computes x Aᵀ in the tile)
        if A is not None and g is not None and eager and (not triton or x2d.shape[0] > _TRITON_DECODE_M):
            t = g.take(self.group_index, x, x2d)
        y = rain_linear(x2d, W, b, st.scale(x, self.name, cached=eager), delta=D, lora_A=A, lora_B=B,
                        bias_delta=bd, shrunk=t)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _beside(self, x: Tensor, base: nn.Module, A: Tensor | None, B: Tensor | None, D: Tensor | None,
                bd: Tensor | None, eager: bool) -> Tensor:
        """``base(x) + s ⊙ (x Dᵀ + d_b)`` (or ``(x Aᵀ) Bᵀ``): the layer runs as loaded (its own matmul,
        accelerate's hook onloading an offloaded weight) and the delta beside it, on the delta's device
        in the compute dtype; the sum comes back in the base output's dtype and device."""
        y = base(x)
        ref = A if A is not None else D if D is not None else bd
        xd = x if x.device == ref.device else x.to(ref.device)
        x2d = xd.reshape(-1, xd.shape[-1])
        if x2d.dtype != ref.dtype:
            x2d = x2d.to(ref.dtype)
        s = self.state.scale(xd, self.name, cached=eager)
        g = self.group
        if A is not None:
            t = g.take(self.group_index, xd, x2d) if g is not None and eager else x2d @ A.t()
            dy = t @ B.t()
        elif D is not None:
            dy = x2d @ D.t()
        else:
            dy = torch.zeros(x2d.shape[0], bd.shape[0], dtype=ref.dtype, device=ref.device)
        if bd is not None:
            dy = dy + bd
        dy = dy * s.to(dy.dtype)[:, None]
        return y + dy.reshape(y.shape).to(device=y.device, dtype=y.dtype)

    def delta_module(self) -> ModuleDelta:
        B = None if self.lora_B is None else self.lora_B.contiguous()  # stored transposed (see __init__)
        return ModuleDelta(delta=self.rain_delta, lora_A=self.lora_A, lora_B=B, bias=self.rain_bias)

    def merged_weight(self, lam: float) -> tuple[Tensor, Tensor | None]:
        """``(W + λ D, b + λ d_b)`` in float32 arithmetic, cast back to the weight's dtype.

        ``lam`` goes through the λ policy; a merged weight that is not finite (``λ·D`` overflowing
        the weight's dtype, e.g. float16) is a ``ValueError`` naming the module, never a NaN / Inf.
        """
        check_lambda(lam, what=f"module {self.name!r}: merged_weight(lam)")
        lam = float(lam)
        # an offloaded weight is read from its hook's weights_map, a quantized one dequantized: the
        # merged copy is dense in the compute dtype; the live layer is not touched
        w = self.dispatcher.dense(self.base, read_tensor(self.base, "weight"))
        d = self.delta_module()
        merged = (w.float() + lam * d.dense(torch.float32).to(w.device)).to(w.dtype)
        b = read_tensor(self.base, "bias")
        if b is not None:
            b = b.to(w.device)
        if d.bias is not None:
            b0 = b.float() if b is not None else torch.zeros(w.shape[0], device=w.device)
            b = (b0 + lam * d.bias.float().to(w.device)).to(w.dtype)
        for t in (merged, b if d.bias is not None else None):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"module {self.name!r}: W + λ·D at λ = {lam:g} is not finite in {w.dtype} "
                                 "(overflow); nothing was merged")
        return merged, b

    def extra_repr(self) -> str:
        kind = f"lowrank r={self.lora_A.shape[0]}" if self.lora_A is not None else "dense"
        return (f"{self.in_features} -> {self.out_features}, delta={kind}, bias_delta={self.rain_bias is not None}, "
                f"backend={self.dispatcher.backend}, path={self.path}")


class ShrinkGroup:
    """Low-rank RainLinears that read the same input (q/k/v, gate/up of one layer): one shrink.

    At attach the members' ``lora_A [r_i, in]`` are stacked into ``A_cat [Σr, in]``, a non-persistent
    buffer ``rain_group_A`` of the first member (so ``model.to()`` moves it; each member keeps its
    own ``lora_A`` too, for the other paths and the exports). The first member called with an
    input x computes ``t_all = x A_catᵀ [M, Σr]`` once (x's dtype; times λ on the fast path,
    unscaled for the kernels) and keeps it; member i then reads its own column block of it. An
    entry is served only for the very tensor object it was made from (a reference is held, so its
    id cannot be reused) and the very λ object it was scaled by, with the same shape and autograd
    version (``x._version``: an in-place change invalidates it), and at most once per member: when
    every member has taken it, it is dropped; a member called again, or with any other input,
    recomputes. Inference tensors (``torch.inference_mode``) track no version, so
    there an in-place change of x *between two members' calls* would go unseen — HF's attention /
    MLP forwards call the members back to back on an unmodified input. Never used under
    CUDA-graph capture or ``torch.compile`` (Python-side state), where each member shrinks alone.
    """

    def __init__(self, members: Sequence["RainLinear"]) -> None:
        owner = members[0]
        owner.register_buffer("rain_group_A", torch.cat([m.lora_A for m in members]).contiguous(), persistent=False)
        self.owner = owner
        self.size = len(members)
        self.ranks = [int(m.lora_A.shape[0]) for m in members]
        for i, m in enumerate(members):
            m.group, m.group_index = self, i
        self.clear()

    def clear(self) -> None:
        self._x: Tensor | None = None
        self._lam: float | Tensor | None = None  # the λ object t_all was scaled by (None: unscaled)
        self._t: tuple[Tensor, ...] | None = None  # t_all split into the members' column blocks
        self._key: tuple = ()
        self._pending = 0  # bit i set: member i has not taken the current entry yet

    def take(self, index: int, x: Tensor, x2d: Tensor, lam: float | Tensor | None = None) -> Tensor:
        """Member ``index``'s block ``[M, r_i]`` (a column view) of t_all = x A_catᵀ, times ``lam`` (a
        host float or a column ``[M, 1]``) when given: from the cached entry if it is for this very x
        and this very λ object, else computed (and cached for the other members)."""
        key = (x.shape, -1 if x.is_inference() else x._version)
        bit = 1 << index
        if self._x is x and self._lam is lam and self._key == key and self._pending & bit:
            t = self._t[index]
            self._pending &= ~bit
            if not self._pending:
                self.clear()  # everyone served: hold no activation past the module's forward
            return t
        t_all = lowrank_shrink(x2d, self.owner.rain_group_A)
        if lam is not None:
            t_all = t_all * lam
        parts = t_all.split(self.ranks, dim=1)  # one op for all the members' views
        self._x, self._lam, self._t, self._key = x, lam, parts, key
        self._pending = ((1 << self.size) - 1) & ~bit
        return parts[index]


def group_shared_inputs(layers: dict[str, RainLinear]) -> list[ShrinkGroup]:
    """Form the :class:`ShrinkGroup` of every parent's q/k/v and gate/up that are low rank and alike
    (same ``in_features``, dtype and device of ``lora_A``); two members at least. Returns them."""
    buckets: dict[tuple, list[RainLinear]] = {}
    for name, layer in layers.items():
        if layer.lora_A is None:
            continue
        try:
            role = module_role(name)
        except ValueError:
            continue
        for i, roles in enumerate(SHARED_INPUT_ROLES):
            if role in roles:
                a = layer.lora_A
                key = (name.rpartition(".")[0], i, layer.in_features, a.dtype, a.device)
                buckets.setdefault(key, []).append(layer)
    return [ShrinkGroup(m) for m in buckets.values() if len(m) > 1]
