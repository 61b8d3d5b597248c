"""Module inputs of the LRM at the thinking positions Ω (docs/DESIGN.md §5.2, §6.2).

For every targeted linear k, the features are X^k ``[n, in]``: the rows of the module's input at
the Ω positions of every calibration sample, in sample order (n = Σ |Ω_i|). Stored float32 on the
CPU. Modules that read the same tensor share one X (q/k/v read the attention input, gate/up the
MLP input), so a layer holds at most four distinct matrices.

Two modes giving the same features:

* one pass (default): forward pre-hooks on the targeted linears, one forward of the decoder per
  batch (right padding; the forward stops after the last targeted layer, never computes lm_head);
* an LRM dispatched by accelerate (``--device-map``): the same one pass; accelerate's
  ``AlignDevicesHook`` runs each module on its execution device (loading ``cpu`` / ``disk``
  weights for the call), the hooks see each input on that device and copy the Ω rows into the
  float32 CPU buffers (the gather to the accumulation device), and the token ids go to the input
  embedding's execution device. When the pass stops early (the exception below), the hook's
  ``post_forward`` of the stopping layer does not run: that one layer's offloaded weights stay
  loaded until its next forward (one layer of memory, not a correctness issue);
* ``sequential=True``: capture the inputs of decoder layer 0 once (offloaded to the CPU), then run
  one decoder layer at a time over all batches, moving the layer to ``device`` for its turn and
  propagating the hidden states (GPTQ-style), so a model larger than the device can be built.

:func:`iter_layer_features` yields ``(layer, {module: X})`` layer by layer so the caller can
project and free a layer's features before the next one (in sequential mode the features of later
layers do not exist yet).

Memory (measured on a 97.6M-parameter Qwen2, ~3k-token samples, CPU): the forward's own working
set is one layer's activations (~0.2 GB); the feature matrices are small (n·in floats). What used
to grow was the glibc heap: transient activations of varying length, interleaved with the small
feature rows kept by the hooks, fragmented the heap so freed memory was neither reused nor
returned (anonymous memory grew ~30 MB per layer per sample, 0.3 → 1.3 GB over 3 samples). So the
features go into buffers preallocated before the forward (no allocation that outlives a hook
call), runs are under ``torch.inference_mode``, the forward stops as soon as the last needed input
was captured, and :func:`trim_heap` hands freed heap pages back after every batch / layer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..format.arch import decoder_layers, module_layer, module_role
from .calibration import CalibItem, CalibrationSet
from .dispatch import execution_device

#: modules of one layer that read the same input tensor
INPUT_GROUP = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in",
               "gate": "mlp_in", "up": "mlp_in", "down": "down_in"}


class _Stop(Exception):
    pass


def _batches(items: Sequence[CalibItem], batch_size: int) -> list[list[CalibItem]]:
    return [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def _pad(batch: list[CalibItem], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` ``[B, T]`` (Ω indices stay valid)."""
    T = max(len(it.input_ids) for it in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for b, it in enumerate(batch):
        ids[b, :len(it.input_ids)] = torch.tensor(it.input_ids)
        mask[b, :len(it.input_ids)] = 1
    return ids.to(device), mask.to(device)


class _RowSink:
    """Feature buffers ``{key: X [n, in] float32 CPU}`` allocated once, before any forward, and
    filled batch by batch in calibration order (rows of sample i at ``offset[i]:offset[i+1]``).

    Nothing a hook allocates outlives the hook call, so the heap holds no small long-lived blocks
    between the forward's large transient ones (see the module docstring)."""

    def __init__(self, items: Sequence[CalibItem], widths: Mapping, batch_size: int):
        self.items = list(items)
        self.offset = [0]
        for it in self.items:
            self.offset.append(self.offset[-1] + len(it.positions))
        n = self.offset[-1]
        self.bufs: dict = {k: (torch.empty(n, w, dtype=torch.float32) if w else None) for k, w in widths.items()}
        self.batch_size = batch_size
        self._index: dict = {}

    def _idx(self, i: int, device) -> Tensor:
        key = (i, str(device))
        if key not in self._index:
            self._index[key] = torch.tensor(self.items[i].positions, dtype=torch.long, device=device)
        return self._index[key]

    def put(self, key, x: Tensor, batch_no: int) -> None:
        """Copy the rows of ``x [B, T, in]`` at each sample's Ω into ``bufs[key]``."""
        buf = self.bufs[key]
        if buf is None:  # width unknown up front (not an nn.Linear-like module): allocate now
            buf = self.bufs[key] = torch.empty(self.offset[-1], x.shape[-1], dtype=torch.float32)
        first = batch_no * self.batch_size
        for b in range(x.shape[0]):
            i = first + b
            buf[self.offset[i]:self.offset[i + 1]].copy_(x[b].index_select(0, self._idx(i, x.device)))


def _width(module: nn.Module) -> int | None:
    """``in`` of a linear (or a RainLinear wrapping one); None when it cannot be told up front."""
    for m in (module, getattr(module, "base", None)):
        w = getattr(m, "in_features", None)
        if isinstance(w, int):
            return w
    return None


_LIBC: list = []


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim(0)``; a no-op without glibc).

    Called between batches / layers of the feature passes: without it the RSS of a long build
    ratchets up with heap fragmentation although the live tensors stay small."""
    if not _LIBC:
        lib = None
        try:
            name = ctypes.util.find_library("c")
            cand = ctypes.CDLL(name) if name else None
            if cand is not None and hasattr(cand, "malloc_trim"):
                lib = cand
        except OSError:
            lib = None
        _LIBC.append(lib)
    if _LIBC[0] is not None:
        _LIBC[0].malloc_trim(0)


def _groups(names: Sequence[str]) -> dict[int, dict[str, list[str]]]:
    """{layer: {group: [module names]}}."""
    out: dict[int, dict[str, list[str]]] = {}
    for n in names:
        out.setdefault(module_layer(n), {}).setdefault(INPUT_GROUP[module_role(n)], []).append(n)
    return out


def _model_device(model: nn.Module) -> torch.device:
    """Where the token ids go: the input embedding's execution device (for an LRM dispatched by
    accelerate its weight may be on ``meta``, offloaded, between forwards)."""
    return execution_device(model.get_input_embeddings())


def _to(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _pad_id(model, pad_id: int | None) -> int:
    if pad_id is not None:
        return pad_id
    cfg = model.config
    for k in ("pad_token_id", "eos_token_id", "bos_token_id"):
        v = getattr(cfg, k, None)
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def iter_layer_features(model: nn.Module, modules: Mapping[str, nn.Module], calib: CalibrationSet, *,
                        sequential: bool = False, batch_size: int = 1, device=None,
                        pad_id: int | None = None, progress: bool = True,
                        ) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """Yield ``(layer, {module name: X [n, in] float32 CPU})`` in increasing layer order."""
    names = list(modules)
    groups = _groups(names)
    if not calib.items:
        raise ValueError("no calibration samples")
    if sequential:
        yield from _sequential(model, groups, modules, calib, batch_size, device, _pad_id(model, pad_id), progress)
    else:
        feats = _one_pass(model, groups, modules, calib, batch_size, _pad_id(model, pad_id), progress)
        for layer in sorted(groups):
            yield layer, {n: feats[(layer, g)] for g, ns in groups[layer].items() for n in ns}


def collect_features(model, modules, calib, **kw) -> dict[str, Tensor]:
    """All features at once: ``{module name: X [n, in]}`` (see :func:`iter_layer_features`)."""
    out: dict[str, Tensor] = {}
    for _, f in iter_layer_features(model, modules, calib, **kw):
        out.update(f)
    return out


def _one_pass(model, groups, modules, calib, batch_size, pad_id, progress) -> dict[tuple[int, str], Tensor]:
    """All layers in one forward per batch; stops right after the last needed input is captured."""
    from tqdm.auto import tqdm

    keys = [(l, g) for l, gs in groups.items() for g in gs]
    sink = _RowSink(calib.items, {(l, g): _width(modules[groups[l][g][0]]) for l, g in keys}, batch_size)
    state = {"batch": 0, "seen": set()}
    handles = []

    def hook_for(key):
        def hook(mod, args, kwargs=None):
            x = args[0] if args else next(iter(kwargs.values()))
            sink.put(key, x, state["batch"])
            state["seen"].add(key)
            if len(state["seen"]) == len(keys):
                raise _Stop  # every feature of this batch is in: the rest of the forward is not needed
        return hook

    for key in keys:
        l, g = key
        handles.append(modules[groups[l][g][0]].register_forward_pre_hook(hook_for(key)))
    last = decoder_layers(model)[max(groups)]

    def stop(mod, args, out):
        raise _Stop

    handles.append(last.register_forward_hook(stop))
    dev = _model_device(model)
    decoder = getattr(model, "model", model)
    try:
        with torch.inference_mode():
            for bi, batch in enumerate(tqdm(_batches(calib.items, batch_size), desc="features", disable=not progress)):
                state["batch"], state["seen"] = bi, set()
                ids, mask = _pad(batch, pad_id, dev)
                try:
                    decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                except _Stop:
                    pass
                missing = [k for k in keys if k not in state["seen"]]
                if missing:
                    l, g = missing[0]
                    raise RuntimeError(f"features: module {groups[l][g][0]!r} did not run in the LRM forward")
                del ids, mask
                trim_heap()
    finally:
        for h in handles:
            h.remove()
    return sink.bufs


def _sequential(model, groups, modules, calib, batch_size, device, pad_id, progress):
    """Layer-by-layer capture: inputs of layer 0 once, then one decoder layer at a time.

    Holds the hidden states of every batch (``[B, T, hidden]`` each, on the CPU) plus one layer's
    work; the last targeted layer stops as soon as its last needed input was captured."""
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    dev = _model_device(model)
    run_dev = torch.device(device) if device is not None else dev
    batches = _batches(calib.items, batch_size)
    states: list[Tensor] = []
    kwargs_list: list[dict] = []

    def grab(mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw["use_cache"] = False
        for k in ("past_key_values", "past_key_value", "cache"):
            if k in kw:
                kw[k] = None
        states.append(hidden.detach().to("cpu"))
        kwargs_list.append(_to(kw, "cpu"))
        raise _Stop

    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    decoder = getattr(model, "model", model)
    try:
        with torch.inference_mode():
            for batch in batches:
                ids, mask = _pad(batch, pad_id, dev)
                try:
                    decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                except _Stop:
                    pass
    finally:
        h.remove()
    trim_heap()

    last = max(groups)
    for l in tqdm(range(last + 1), desc="features (sequential)", disable=not progress):
        layer = layers[l]
        home = next(layer.parameters()).device
        layer.to(run_dev)
        lg = groups.get(l, {})
        sink = _RowSink(calib.items, {g: _width(modules[ns[0]]) for g, ns in lg.items()}, batch_size)
        state = {"batch": 0, "seen": set()}
        handles = []

        def hook_for(g):
            def hook(mod, args):
                sink.put(g, args[0], state["batch"])
                state["seen"].add(g)
                if l == last and len(state["seen"]) == len(lg):
                    raise _Stop  # the last layer's output is not needed
            return hook

        for g, ns in lg.items():
            handles.append(modules[ns[0]].register_forward_pre_hook(hook_for(g)))
        try:
            with torch.inference_mode():
                for i, batch in enumerate(batches):
                    state["batch"], state["seen"] = i, set()
                    try:
                        out = layer(states[i].to(run_dev), **_to(kwargs_list[i], run_dev))
                    except _Stop:
                        out = None
                    missing = [g for g in lg if g not in state["seen"]]
                    if missing:
                        raise RuntimeError(f"features: module {lg[missing[0]][0]!r} did not run in its decoder layer")
                    if l < last:
                        if isinstance(out, (tuple, list)):
                            out = out[0]
                        states[i] = out.detach().to("cpu")
                    del out
        finally:
            for hd in handles:
                hd.remove()
            layer.to(home)
        if l == last:
            states.clear()
            kwargs_list.clear()
        trim_heap()
        if lg:
            yield l, {n: sink.bufs[g] for g, ns in lg.items() for n in ns}
