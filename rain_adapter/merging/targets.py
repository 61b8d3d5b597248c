"""The LRM in a build: which of its linears the build touches, and their fingerprint (``pipeline``
steps 3-4).

:func:`load_lrm` loads the LRM once when the build runs it (Stage 1 features, Stage 2
statistics: :func:`needs_lrm_weights`). A method that runs no LRM forward (task-arithmetic,
ties, dare-ties) loads none of its weights: :func:`skeleton_targets` takes the module names and
shapes from the preflight's ``meta`` skeleton and reads the fingerprint from the LRM's
safetensors, only the rows that hold sampled entries (:func:`streamed_fingerprint`), cast to
``--dtype`` first as loading would, so the adapter config is the same bytes.
"""

from __future__ import annotations

import gc
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..format.fingerprint import compute_fingerprint, fingerprint_record_from_rows
from . import preflight, taskvector
from .dispatch import execution_device, load_dispatched
from .features import trim_heap
from .hub import fetching
from .methods import MergeMethod
from .options import BuildOptions
from .report import BuildLog

__all__ = ["Targets", "load_lrm", "needs_lrm_weights", "skeleton_targets", "streamed_fingerprint", "wants_stage2"]


@dataclass
class Targets:
    """The LRM and what the build touches in it.

    ``model``: the loaded LRM; None when the build never loads it (:func:`skeleton_targets`) or
    after :meth:`release`. ``modules``: targeted linears by full name, layer-major (``meta``
    linears from the skeleton when the LRM is not loaded); ``by_layer``: layer → its module
    names; ``proj_layers``: the layers Stage 1 projects (the others keep the plain Δ);
    ``fingerprint``: the LRM's weights per module, taken once (the build never changes them).
    """

    model: nn.Module | None
    modules: dict[str, nn.Linear]
    names: list[str]
    by_layer: dict[int, list[str]]
    layer_ids: list[int]
    proj_layers: set[int]
    fingerprint: dict[str, Any]
    #: ``--device-map``: the resolved map the LRM was loaded with (None: one device)
    device_map: dict[str, Any] | None = None
    #: ``--device-map`` without ``--offload-folder``: the temporary folder for ``disk`` modules
    offload_dir: tempfile.TemporaryDirectory | None = None

    @property
    def input_device(self) -> torch.device | None:
        """Where the token ids go: the input embedding's execution device for a dispatched LRM
        (``dispatch.execution_device``), None otherwise (the caller's ``--device`` / the model's)."""
        if self.model is None or self.device_map is None:
            return None
        return execution_device(self.model.get_input_embeddings())

    def release(self) -> None:
        """Drop the LRM (and the references to its linears) and give the memory back."""
        self.model, self.modules = None, {}
        if self.offload_dir is not None:
            self.offload_dir.cleanup()
            self.offload_dir = None
        gc.collect()
        trim_heap()


def wants_stage2(opts: BuildOptions, method: MergeMethod) -> bool:
    """Whether Stage 2 runs: a Stage 2 method, an instruction set, no ``--no-stage2``."""
    return method.stage2 and opts.instruction_calib is not None and not opts.no_stage2


def needs_lrm_weights(opts: BuildOptions, method: MergeMethod) -> bool:
    """Whether the build runs the LRM: Stage 1's features (a projecting method) or Stage 2's
    attention statistics. A method with neither (task-arithmetic, ties, dare-ties) needs only the
    LRM's module names and shapes and its fingerprint."""
    return method.projects or wants_stage2(opts, method)


def streamed_fingerprint(reader: taskvector.CheckpointReader, modules: dict[str, nn.Module],
                         dtype: torch.dtype) -> dict[str, Any]:
    """The fingerprint ``compute_fingerprint`` takes of the loaded LRM (``dtype``), read from its
    safetensors instead: per targeted module only the rows holding sampled entries. A module the
    checkpoint lacks (``<name>.weight``) or holds with another shape than ``modules`` (the
    skeleton) is a :class:`~rain_adapter.merging.taskvector.CheckpointError`."""
    out = {}
    for name, m in modules.items():
        wname, want = name + ".weight", tuple(m.weight.shape)
        got = reader.shape(wname)
        if got != want:
            raise taskvector.CheckpointError(f"LRM tensor {wname!r} in {reader.file_of(wname)} has shape "
                                             f"{list(got)}, its module in the config has {list(want)}")
        out[name] = fingerprint_record_from_rows(got, lambda rows, w=wname: reader.rows(w, rows), dtype)
    return out


def skeleton_targets(opts: BuildOptions, method: MergeMethod, skeleton: nn.Module,
                     log: BuildLog | None = None) -> Targets | None:
    """The targets from the preflight's ``meta`` skeleton (names and shapes, no weights) and the
    fingerprint streamed from the LRM's safetensors (:func:`streamed_fingerprint`); None (the
    caller loads the LRM) when the checkpoint cannot give the fingerprint that way."""
    say = log or (lambda msg: None)
    modules, by_layer, layer_ids, proj_layers = preflight.select_targets(opts, method, skeleton)
    try:
        fingerprint = streamed_fingerprint(taskvector.CheckpointReader(opts.lrm, "LRM"), modules, opts.model_dtype)
    except taskvector.CheckpointError as e:
        say(f"[rain build] the LRM's fingerprint cannot be read from its safetensors ({e}): loading the LRM")
        return None
    say(f"[rain build] LRM: module names and shapes from its config, fingerprint from its safetensors "
        f"({method.name} runs no LRM forward, so its weights are not loaded)")
    return Targets(None, modules, list(modules), by_layer, layer_ids, proj_layers, fingerprint)


def load_lrm(opts: BuildOptions, method: MergeMethod, skeleton: nn.Module | None = None,
             log: BuildLog | None = None, device_map: dict[str, Any] | None = None) -> Targets:
    """The LRM's targets. When the build runs no LRM forward (:func:`needs_lrm_weights` False) and
    the preflight built the ``meta`` ``skeleton``: :func:`skeleton_targets`, no weights loaded.
    Otherwise load the LRM once (eval, ``opts.dtype``), pick the targeted linears, fingerprint them;
    with ``device_map`` (``--device-map``, resolved by ``dispatch.resolve_device_map``):
    :func:`load_dispatched_lrm`."""
    if skeleton is not None and not needs_lrm_weights(opts, method):
        targets = skeleton_targets(opts, method, skeleton, log)
        if targets is not None:
            return targets
    if device_map is not None:
        return load_dispatched_lrm(opts, method, device_map, log)
    from transformers import AutoModelForCausalLM  # lazy, as above

    with fetching(opts.lrm, "lrm"):
        model = AutoModelForCausalLM.from_pretrained(str(opts.lrm), dtype=opts.model_dtype)
    model.eval()
    modules, by_layer, layer_ids, proj_layers = preflight.select_targets(opts, method, model)
    names = list(modules)
    fingerprint = compute_fingerprint(model, names)  # the LRM's weights: fixed for the whole build
    if opts.device is not None and not opts.sequential:
        model.to(opts.device)
    return Targets(model, modules, names, by_layer, layer_ids, proj_layers, fingerprint)


def load_dispatched_lrm(opts: BuildOptions, method: MergeMethod, device_map: dict[str, Any],
                        log: BuildLog | None = None) -> Targets:
    """The LRM loaded with ``device_map`` (accelerate's hooks move each module's inputs, and for
    ``cpu`` / ``disk`` modules its weights, to its execution device at every forward); never moved
    afterwards. Offloaded weights are on ``meta`` between forwards, so the fingerprint is streamed
    from the LRM's safetensors (:func:`streamed_fingerprint`: the same record ``compute_fingerprint``
    takes of a loaded model), falling back to the loaded weights when no module is offloaded."""
    say = log or (lambda msg: None)
    tmp = None
    folder = opts.offload_folder
    if folder is None and "disk" in device_map.values():
        tmp = tempfile.TemporaryDirectory(prefix="rain-offload-")
        folder = tmp.name
    with fetching(opts.lrm, "lrm"):
        model = load_dispatched(opts.lrm, opts.model_dtype, device_map, folder)
    model.eval()
    modules, by_layer, layer_ids, proj_layers = preflight.select_targets(opts, method, model)
    names = list(modules)
    if any(d in ("cpu", "disk") for d in device_map.values()) and any(
            m.weight.device.type == "meta" for m in modules.values()):
        fingerprint = streamed_fingerprint(taskvector.CheckpointReader(opts.lrm, "LRM"), modules, opts.model_dtype)
    else:
        fingerprint = compute_fingerprint(model, names)
    placed = sorted({str(d) for d in device_map.values()})
    say(f"[rain build] LRM dispatched by accelerate over {', '.join(placed)} (--device-map {opts.device_map})")
    return Targets(model, modules, names, by_layer, layer_ids, proj_layers, fingerprint, dict(device_map), tmp)
