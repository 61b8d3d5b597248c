"""RainAdapter.attach / RainModel: the λ knob on a live Hugging Face model.

``attach`` validates everything first (modules exist and are ``nn.Linear``, shapes, fingerprint,
finite deltas) and only then swaps each targeted linear for a :class:`RainLinear`, so a failure
leaves the model untouched. ``RainModel`` forwards every attribute to the wrapped model and adds
the λ API.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..format.config import RainConfig
from ..format.delta import ModuleDelta
from ..format.lambdas import check_lambda
from .layers import LambdaState, RainLinear, group_shared_inputs
from ..format import fingerprint
from ..format.store import AdapterError, adapter_from

LambdaLike = float | Sequence[float] | Tensor


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _check_modules(model: nn.Module, deltas: dict[str, ModuleDelta], source: str) -> dict[str, nn.Module]:
    """``model.named_modules()`` after checking that every delta fits its module (present, an
    unwrapped ``nn.Linear``, same ``[out, in]``, a bias delta only on a layer with a bias, finite);
    an :class:`AdapterError` naming the module otherwise. Touches nothing."""
    modules = dict(model.named_modules())
    for name, d in deltas.items():
        mod = modules.get(name)
        if not isinstance(d, ModuleDelta):
            raise AdapterError(f"module {name!r}: expected a ModuleDelta, got {type(d).__name__}")
        if mod is None:
            raise AdapterError(f"module {name!r}: in the adapter ({source}) but not in {type(model).__name__}")
        if isinstance(mod, RainLinear):
            raise AdapterError(f"module {name!r}: already wrapped by a RAIN adapter")
        if not isinstance(mod, nn.Linear):
            raise AdapterError(f"module {name!r}: is {type(mod).__name__}, expected nn.Linear")
        if tuple(d.shape) != tuple(mod.weight.shape):
            raise AdapterError(
                f"module {name!r}: adapter delta has shape {list(d.shape)}, model weight {list(mod.weight.shape)}"
            )
        if d.bias is not None and mod.bias is None:
            raise AdapterError(f"module {name!r}: adapter has a bias delta but the model's layer has no bias")
        for suffix, t in d.tensors().items():
            if not torch.isfinite(t).all():
                raise AdapterError(f"module {name!r}: {suffix} holds NaN or Inf")
    return modules


class RainModel:
    """An HF causal LM with a RAIN adapter attached. Behaves like the wrapped model.

    ``model(...)``, ``model.generate(...)``, ``model.config``, ``model.device`` and any other attribute
    go to the wrapped model. Added: :meth:`set_lambda`, :meth:`lambda_scope`, ``generate(...,
    rain_lambda=...)``, :meth:`merge`, :meth:`save_pretrained` (merged weights) and :meth:`detach`.
    """

    def __init__(self, model: nn.Module, config: RainConfig, layers: dict[str, RainLinear],
                 originals: dict[str, nn.Linear], state: LambdaState, source: str) -> None:
        # object.__setattr__: __getattr__ below forwards unknown names to the wrapped model.
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "rain_config", config)
        object.__setattr__(self, "rain_layers", layers)
        object.__setattr__(self, "_originals", originals)
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "rain_source", source)
        object.__setattr__(self, "_attached", True)

    # -- behave like the wrapped model ----------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "model"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.model, name, value)

    def __call__(self, *args, rain_lambda: LambdaLike | None = None, **kwargs):
        if rain_lambda is None:
            return self.model(*args, **kwargs)
        with self._scope(rain_lambda, "rain_lambda"):
            return self.model(*args, **kwargs)

    forward = __call__

    def __repr__(self) -> str:
        return (f"RainModel({type(self.model).__name__}, adapter={self.rain_source!r}, "
                f"modules={len(self.rain_layers)}, λ={self.get_lambda().tolist()})")

    # -- λ ----------------------------------------------------------------------------------------
    def set_lambda(self, lam: LambdaLike) -> None:
        """Set λ: a float for every row, or a 1-D sequence/tensor with one λ per batch row.

        Rows expanded by beam search / ``num_return_sequences`` get their input row's λ. Never
        rewrites weights; a uniform λ is updated in place on the device. A bool, a non-number, a
        non-finite λ or ``|λ| > 100`` is a ``ValueError`` naming ``lam`` and changes nothing
        (:func:`~rain_adapter.format.lambdas.check_lambda`).
        """
        self._check_attached()
        self._state.set(lam, "set_lambda(lam)")

    def set_token_lambda(self, lam: Sequence[float] | Tensor) -> None:
        """Set one λ per token: ``lam [M]`` for inputs whose token rows flatten to ``M`` (packed
        continuous-batching inputs ``[1, M]``). Stays until the next ``set_lambda`` / ``set_token_lambda``;
        a forward with a different token count raises."""
        self._check_attached()
        self._state.set_tokens(lam, "set_token_lambda(lam)")

    def get_lambda(self) -> Tensor:
        """The current λ as a float32 CPU tensor ``[1]``, ``[batch]`` or (per-token mode) ``[M]``."""
        return self._state.value

    def lambda_scope(self, lam: LambdaLike):
        """``with model.lambda_scope(0.5): ...`` sets λ inside the block and restores it after.

        A refused λ raises on entering the block, with λ unchanged.
        """
        return self._scope(lam, "lambda_scope(lam)")

    @contextmanager
    def _scope(self, lam: LambdaLike, what: str) -> Iterator["RainModel"]:
        self._check_attached()
        old, old_per_token = self._state.value, self._state.per_token
        self._state.set(lam, what)
        try:
            yield self
        finally:
            (self._state.set_tokens if old_per_token else self._state.set)(old)

    def generate(self, *args, rain_lambda: LambdaLike | None = None, **kwargs):
        """``model.generate`` with an optional λ (float or one per input row) for this call."""
        if rain_lambda is None:
            return self.model.generate(*args, **kwargs)
        with self._scope(rain_lambda, "generate(rain_lambda)"):
            return self.model.generate(*args, **kwargs)

    # -- weights ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, lam: float | None = None, *, what: str = "merge(lam)") -> dict[str, Tensor]:
        """Plain merged weights ``{"<module>.weight": W + λD, "<module>.bias": b + λ d_b}``.

        ``lam`` defaults to the current uniform λ. For export; the live model is not changed. A given
        ``lam`` goes through the shared λ policy (:func:`~rain_adapter.format.lambdas.check_lambda`):
        a bool, a non-number, a non-finite λ or ``|λ| > 100`` is a ``ValueError`` naming ``what``,
        as is a merged weight that overflows the model's dtype; nothing is returned half-merged.
        """
        self._check_attached()
        if lam is None:
            cur = self.get_lambda()
            if cur.numel() != 1:
                raise ValueError(f"{what}: needs a single λ; the model holds one per row")
            lam = float(cur[0])
        else:
            check_lambda(lam, self.rain_config.lambda_range, what=what, stacklevel=3)
            if isinstance(lam, Tensor) and lam.numel() != 1 or not isinstance(lam, (Tensor, numbers.Real)):
                raise ValueError(f"{what}: needs a single λ, got {lam!r:.60}")
            lam = float(lam)
        out = {}
        for name, layer in self.rain_layers.items():
            w, b = layer.merged_weight(float(lam))
            out[f"{name}.weight"] = w
            if b is not None:
                out[f"{name}.bias"] = b
        return out

    @torch.no_grad()
    def merged_state_dict(self, lam: float | None = None, *, what: str = "merged_state_dict(lam)") -> dict[str, Tensor]:
        """The wrapped model's state dict with original key names and merged target weights."""
        merged = self.merge(lam, what=what)
        sd = {}
        for key, t in self.model.state_dict().items():
            # RainLinear stores the original layer under `.base.`
            sd[key.replace(".base.", ".") if ".base." in key else key] = t
        sd.update(merged)
        return sd

    def save_pretrained(self, path: str | Path, lam: float | None = None, **kwargs) -> None:
        """Save a plain HF checkpoint of the merged model at ``lam``.

        Everything is merged and checked (λ policy, finite weights) before anything is written, so
        a refused ``lam`` leaves no files.
        """
        self.model.save_pretrained(path, state_dict=self.merged_state_dict(lam, what="save_pretrained(lam)"),
                                   **kwargs)

    def detach(self) -> nn.Module:
        """Put the original ``nn.Linear`` modules back and return the bare model."""
        self._check_attached()
        for name, orig in self._originals.items():
            parent, child = _parent(self.model, name)
            setattr(parent, child, orig)
        object.__setattr__(self, "_attached", False)
        return self.model

    def _check_attached(self) -> None:
        if not object.__getattribute__(self, "_attached"):
            raise RuntimeError("this RainModel was detached")


class RainAdapter:
    """Entry point: ``RainAdapter.attach(lrm, "rain-qwen14b")``."""

    @staticmethod
    def attach(
        model: nn.Module,
        adapter: str | Path | tuple[RainConfig, dict[str, ModuleDelta]],
        lam: LambdaLike | None = None,
        device: str | torch.device | None = None,
        *,
        check_fingerprint: bool = True,
    ) -> RainModel:
        """Wrap the adapter's target linears of ``model`` in :class:`RainLinear`; all or nothing.

        ``adapter`` is a directory, a name in ``$RAIN_ADAPTER_HOME``, a Hub repo id, a PEFT LoRA
        directory, or an in-memory ``(RainConfig, {module: ModuleDelta})`` pair. ``lam`` defaults to
        the config's ``default_lambda``. Deltas go to the device and dtype of the layer they wrap;
        ``device``, if given, moves the whole model (deltas included) there after attaching.
        """
        if isinstance(model, RainModel):
            raise ValueError("model already has a RAIN adapter attached; detach() it first")
        config, deltas, source = adapter_from(adapter)
        if not deltas:
            raise AdapterError(f"{source}: adapter holds no module deltas")
        # 1. validate everything before touching the model
        modules = _check_modules(model, deltas, source)
        if check_fingerprint and config.fingerprint:
            fingerprint.check_fingerprint(config, model)
        state = LambdaState(config.default_lambda if lam is None else 1.0, config.lambda_range)
        if lam is not None:
            state.set(lam, "attach(lam)")
        # 2. build every wrapper (allocations may fail: still nothing swapped)
        wrappers: dict[str, RainLinear] = {}
        for name, d in deltas.items():
            wrappers[name] = RainLinear(modules[name], d, state, name=name)
        # q/k/v and gate/up read one input: their lora_A stacked, one shrink per group and forward
        group_shared_inputs(wrappers)
        # 3. swap (plain setattr; cannot fail half-way for valid names)
        originals = {}
        for name, w in wrappers.items():
            parent, child = _parent(model, name)
            originals[name] = getattr(parent, child)
            setattr(parent, child, w)
        if device is not None:
            try:
                model.to(device)
            except BaseException:  # e.g. out of memory: put the original layers back, never half-attached
                for name, orig in originals.items():
                    parent, child = _parent(model, name)
                    setattr(parent, child, orig)
                raise
        return RainModel(model, config, wrappers, originals, state, source)

