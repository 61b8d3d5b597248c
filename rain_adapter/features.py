"""Module inputs of the LRM at the thinking positions Ω (DESIGN.md §5.2, §6.2).

For every targeted linear k, the features are X^k ``[n, in]``: the rows of the module's input at
the Ω positions of every calibration sample, in sample order (n = Σ |Ω_i|). Stored float32 on the
CPU. Modules that read the same tensor share one X (q/k/v read the attention input, gate/up the
MLP input), so a layer holds at most four distinct matrices.

Two modes giving the same features:

* one pass (default): forward pre-hooks on the targeted linears, one forward of the decoder per
  batch (right padding; the forward stops after the last targeted layer, never computes lm_head);
* ``sequential=True``: capture the inputs of decoder layer 0 once (offloaded to the CPU), then run
  one decoder layer at a time over all batches, moving the layer to ``device`` for its turn and
  propagating the hidden states (GPTQ-style), so a model larger than the device can be built.

:func:`iter_layer_features` yields ``(layer, {module: X})`` layer by layer so the caller can
project and free a layer's features before the next one (in sequential mode the features of later
layers do not exist yet).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .arch import decoder_layers, module_layer, module_role
from .calibration import CalibItem, CalibrationSet

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


def _gather(x: Tensor, batch: list[CalibItem]) -> Tensor:
    """Rows of ``x [B, T, in]`` at each sample's Ω → ``[Σ|Ω|, in]`` float32 CPU."""
    rows = [x[b, torch.tensor(it.positions, device=x.device)] for b, it in enumerate(batch)]
    return torch.cat(rows, 0).detach().to("cpu", torch.float32)


def _groups(names: Sequence[str]) -> dict[int, dict[str, list[str]]]:
    """{layer: {group: [module names]}}."""
    out: dict[int, dict[str, list[str]]] = {}
    for n in names:
        out.setdefault(module_layer(n), {}).setdefault(INPUT_GROUP[module_role(n)], []).append(n)
    return out


def _model_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


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
    from tqdm.auto import tqdm

    rows: dict[tuple[int, str], list[Tensor]] = {(l, g): [] for l, gs in groups.items() for g in gs}
    current: list[list[CalibItem]] = [[]]
    handles = []

    def hook_for(key):
        def hook(mod, args, kwargs=None):
            x = args[0] if args else next(iter(kwargs.values()))
            rows[key].append(_gather(x, current[0]))
        return hook

    for (l, g), _ in rows.items():
        first = groups[l][g][0]
        handles.append(modules[first].register_forward_pre_hook(hook_for((l, g))))
    last = decoder_layers(model)[max(groups)]

    def stop(mod, args, out):
        raise _Stop

    handles.append(last.register_forward_hook(stop))
    dev = _model_device(model)
    decoder = getattr(model, "model", model)
    try:
        with torch.no_grad():
            for batch in tqdm(_batches(calib.items, batch_size), desc="features", disable=not progress):
                current[0] = batch
                ids, mask = _pad(batch, pad_id, dev)
                try:
                    decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v, 0) for k, v in rows.items()}


def _sequential(model, groups, modules, calib, batch_size, device, pad_id, progress):
    """Layer-by-layer capture: inputs of layer 0 once, then one decoder layer at a time."""
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
        with torch.no_grad():
            for batch in batches:
                ids, mask = _pad(batch, pad_id, dev)
                try:
                    decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                except _Stop:
                    pass
    finally:
        h.remove()

    last = max(groups)
    for l in tqdm(range(last + 1), desc="features (sequential)", disable=not progress):
        layer = layers[l]
        home = next(layer.parameters()).device
        layer.to(run_dev)
        lg = groups.get(l, {})
        rows: dict[str, list[Tensor]] = {g: [] for g in lg}
        current: list[list[CalibItem]] = [[]]
        handles = []

        def hook_for(g):
            def hook(mod, args):
                rows[g].append(_gather(args[0], current[0]))
            return hook

        for g, ns in lg.items():
            handles.append(modules[ns[0]].register_forward_pre_hook(hook_for(g)))
        try:
            with torch.no_grad():
                for i, batch in enumerate(batches):
                    current[0] = batch
                    out = layer(states[i].to(run_dev), **_to(kwargs_list[i], run_dev))
                    if isinstance(out, (tuple, list)):
                        out = out[0]
                    if l < last:
                        states[i] = out.detach().to("cpu")
        finally:
            for hd in handles:
                hd.remove()
            layer.to(home)
        if lg:
            feats = {g: torch.cat(r, 0) for g, r in rows.items()}
            yield l, {n: feats[g] for g, ns in lg.items() for n in ns}
