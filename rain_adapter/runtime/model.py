"""RainAdapter.attach / RainModel: the λ knob on a live Hugging Face model.

``attach`` validates everything first (modules exist and are linears one of the dispatchers of
:mod:`~rain_adapter.runtime.dispatchers` accepts, shapes, fingerprint, finite deltas) and only then
swaps each targeted linear for a :class:`RainLinear`, so a failure leaves the model untouched.

``RainModel`` is an ``nn.Module`` whose one child is the wrapped model (``.model``); unknown
attributes are forwarded to it and it adds the λ API. Its ``state_dict()`` has the bare model's
keys and values (no ``model.`` prefix, no ``.base.``, no RAIN deltas: the adapter is saved by its
own format; :meth:`RainModel.merged_state_dict` / :meth:`RainModel.save_pretrained` give the merged
model), so ``bare.load_state_dict(rain_model.state_dict())`` round-trips.

Dispatched models (``device_map``, accelerate hooks, CPU / disk offload) and quantized bases are
handled per layer: see :mod:`~rain_adapter.runtime.offload` and
:mod:`~rain_adapter.runtime.dispatchers`.
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
from .dispatchers import QUANT_SAMPLE_RTOL, Dispatcher, dispatch, linear_shape
from .layers import LambdaState, RainLinear, group_shared_inputs
from .offload import check_hook_layout, execution_device, read_tensor
from .statedict import bare_keys_hooks
from ..format import fingerprint
from ..format.store import AdapterError, adapter_from

LambdaLike = float | Sequence[float] | Tensor


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _check_modules(model: nn.Module, deltas: dict[str, ModuleDelta], source: str
                   ) -> tuple[dict[str, nn.Module], dict[str, Dispatcher]]:
    """``(model.named_modules(), {name: dispatcher})`` after checking that every delta fits its
    module (present, unwrapped, a linear some dispatcher accepts, same ``[out, in]`` — read from the
    shape only, so a meta / quantized weight is never loaded —, a bias delta only on a layer with a
    bias, finite); an :class:`AdapterError` naming the module otherwise. Touches nothing."""
    modules = dict(model.named_modules())
    dispatchers = {}
    for name, d in deltas.items():
        mod = modules.get(name)
        if not isinstance(d, ModuleDelta):
            raise AdapterError(f"module {name!r}: expected a ModuleDelta, got {type(d).__name__}")
        if mod is None:
            raise AdapterError(f"module {name!r}: in the adapter ({source}) but not in {type(model).__name__}")
        if isinstance(mod, RainLinear):
            raise AdapterError(f"module {name!r}: already wrapped by a RAIN adapter")
        dispatchers[name] = dispatch(mod, name)
        check_hook_layout(model, name, mod)
        shape = linear_shape(mod)
        if tuple(d.shape) != shape:
            raise AdapterError(f"module {name!r}: adapter delta has shape {list(d.shape)}, model weight {list(shape)}")
        if d.bias is not None and mod.bias is None:
            raise AdapterError(f"module {name!r}: adapter has a bias delta but the model's layer has no bias")
        for suffix, t in d.tensors().items():
            if not torch.isfinite(t).all():
                raise AdapterError(f"module {name!r}: {suffix} holds NaN or Inf")
    return modules, dispatchers


def _check_fingerprint(config: RainConfig, modules: dict[str, nn.Module]) -> None:
    """:func:`~rain_adapter.format.fingerprint.check_fingerprint` for any dispatched layer, one module
    at a time: an offloaded weight is read from its hook's weights_map (then dropped), a quantized
    one dequantized and compared with :data:`QUANT_SAMPLE_RTOL` (relative L2 distance of the sample)
    instead of the per-value tolerance."""
    for name, want in config.fingerprint.items():
        mod = modules.get(name)
        if mod is None:
            raise AdapterError(f"module {name!r}: in the adapter's fingerprint but not in the model")
        if isinstance(mod, RainLinear):
            mod = mod.base
        if not isinstance(want, dict) or not isinstance(want.get("shape"), list):
            raise AdapterError(f"module {name!r}: malformed fingerprint record {str(want)[:120]}")
        why = fingerprint.fingerprint_scheme_problem(want)
        if why:
            raise AdapterError(f"module {name!r}: fingerprint record {why}")
        disp = dispatch(mod, name)
        shape = list(linear_shape(mod))
        if shape != list(want["shape"]):
            raise AdapterError(f"module {name!r}: model weight has shape {shape}, adapter was built for {want['shape']}")
        w = disp.dense(mod, read_tensor(mod, "weight"))
        if disp.exact:
            why = fingerprint.values_mismatch(want, w, name)
        else:
            ref = fingerprint._decode(want.get("sample"), name) if isinstance(want.get("sample"), str) else None
            if ref is None or ref.numel() > min(w.numel(), 16 * fingerprint.SAMPLE_SIZE):
                raise AdapterError(f"module {name!r}: fingerprint record has no valid 'sample'")
            got = fingerprint.weight_sample(w, ref.numel())
            rel = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
            why = None if rel <= QUANT_SAMPLE_RTOL else (
                f"the sampled values of the dequantized {disp.backend} weight are {rel:.0%} away (L2) from the "
                f"adapter's LRM (a quantization allows {QUANT_SAMPLE_RTOL:.0%})")
        del w
        if why is not None:
            raise AdapterError(
                f"module {name!r}: weights differ from the model the adapter was built for "
                f"({config.base_model_name_or_path or 'unknown'}): {why}; pass check_fingerprint=False "
                "to attach anyway"
            )


#: RainModel's own attributes (everything else is forwarded to the wrapped model)
_OWN = frozenset({"model", "rain_config", "rain_layers", "_originals", "_state", "rain_source", "_attached"})


class RainModel(nn.Module):
    """An HF causal LM with a RAIN adapter attached: an ``nn.Module`` that behaves like the wrapped model.

    ``model(...)``, ``model.generate(...)``, ``model.config``, ``model.device`` and any other attribute
    it does not have itself go to the wrapped model (``.model``, its only child); setting an attribute
    it does not own sets it on the wrapped model. ``.to()`` / ``.eval()`` / ``torch.compile(model)``
    act on the wrapped model (deltas included) and return the RainModel. ``state_dict()`` is the
    bare model's (same keys, no deltas; see the module doc). Added: :meth:`set_lambda`,
    :meth:`lambda_scope`, ``generate(..., rain_lambda=...)``, :meth:`merge`, :meth:`merged_state_dict`,
    :meth:`save_pretrained` (merged weights) and :meth:`detach`.
    """

    def __init__(self, model: nn.Module, config: RainConfig, layers: dict[str, RainLinear],
                 originals: dict[str, nn.Module], state: LambdaState, source: str) -> None:
        super().__init__()
        # nn.Module.__setattr__ registers the child; the rest are plain attributes of this object
        # (not submodules: the RainLinears are already children of `model`)
        nn.Module.__setattr__(self, "model", model)
        for k, v in (("rain_config", config), ("rain_layers", layers), ("_originals", originals),
                     ("_state", state), ("rain_source", source), ("_attached", True)):
            object.__setattr__(self, k, v)
        # state_dict / load_state_dict: the bare model's keys ("model." dropped / added back)
        bare_keys_hooks(self, "model")

    # -- behave like the wrapped model ----------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # reached only when normal lookup fails: nn.Module's registries first (the child "model"),
        # then the wrapped model
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        modules = self.__dict__.get("_modules")
        if modules is None or "model" not in modules or name.startswith("__") and name.endswith("__"):
            # during __init__ / unpickling; and protocol lookups (__deepcopy__, …) are never forwarded
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(modules["model"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN or name in self.__dict__ or hasattr(type(self), name):
            nn.Module.__setattr__(self, name, value)
        else:
            setattr(self._modules["model"], name, value)

    def __delattr__(self, name: str) -> None:
        if name in _OWN or name in self.__dict__ or name in self._modules:
            nn.Module.__delattr__(self, name)
        else:
            delattr(self._modules["model"], name)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(dir(self._modules["model"])))

    def forward(self, *args, rain_lambda: LambdaLike | None = None, **kwargs):
        """The wrapped model's forward, with an optional λ (float or one per input row) for this call."""
        if rain_lambda is None:
            return self.model(*args, **kwargs)
        with self._scope(rain_lambda, "rain_lambda"):
            return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        return (f"RainModel({type(self.model).__name__}, adapter={self.rain_source!r}, "
                f"modules={len(self.rain_layers)}, λ={self.get_lambda().tolist()})")

    def rain_paths(self) -> dict[str, str]:
        """``{module: "fused" | "beside"}``: which forward each wrapped layer runs
        (:attr:`RainLinear.path`)."""
        return {name: layer.path for name, layer in self.rain_layers.items()}

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
        """The wrapped model's state dict with original key names and merged target weights.

        On a dispatched model, offloaded tensors are read through their accelerate hooks (the whole
        model ends up in CPU memory: this is the full checkpoint). A quantized target comes back
        dense (dequantized + λ·Δ) beside the other layers' quantized tensors."""
        merged = self.merge(lam, what=what)
        modules = dict(self.model.named_modules())
        sd = {}
        for key, t in self.model.state_dict().items():  # the bare model's keys (RainLinear's hook)
            if key in merged:
                continue
            if t.device.type == "meta":  # offloaded by accelerate: read through the module's hook
                owner, _, attr = key.rpartition(".")
                mod = modules.get(owner)
                if isinstance(mod, RainLinear):
                    mod = mod.base
                if mod is None:
                    raise ValueError(f"{what}: {key!r} is on the meta device and no module holds it")
                t = read_tensor(mod, attr)
            sd[key] = t
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
        """Put the original linear modules back (accelerate hooks included) and return the bare model."""
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
        the config's ``default_lambda``. Deltas go to the device and dtype of the layer they wrap
        (for a layer accelerate offloads, its hook's execution device; for a quantized layer its
        compute dtype); ``device``, if given, moves the whole model (deltas included) there after
        attaching (not for a dispatched model: accelerate places it).
        """
        if isinstance(model, RainModel):
            raise ValueError("model already has a RAIN adapter attached; detach() it first")
        if device is not None and getattr(model, "hf_device_map", None):
            raise ValueError("attach(device=...): the model is dispatched by accelerate (hf_device_map); its layers "
                             "stay where the device map put them and each delta follows its layer: leave device out")
        config, deltas, source = adapter_from(adapter)
        if not deltas:
            raise AdapterError(f"{source}: adapter holds no module deltas")
        # 1. validate everything before touching the model (shapes only: no weight is loaded)
        modules, dispatchers = _check_modules(model, deltas, source)
        if check_fingerprint and config.fingerprint:
            _check_fingerprint(config, modules)
        state = LambdaState(config.default_lambda if lam is None else 1.0, config.lambda_range)
        if lam is not None:
            state.set(lam, "attach(lam)")
        # 2. build every wrapper (allocations may fail: still nothing swapped). Each delta goes to
        # its layer's execution device: the weight's, or for an offloaded (meta) weight its hook's
        wrappers: dict[str, RainLinear] = {}
        for name, d in deltas.items():
            mod = modules[name]
            wrappers[name] = RainLinear(mod, d, state, name=name, dispatcher=dispatchers[name],
                                        device=execution_device(model, name, mod))
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

