"""The LRM dispatched by accelerate for a build: ``--device-map``, ``--max-memory``, ``--offload-folder``
(docs/DESIGN.md §5.8).

A device map assigns every module of the LRM to a device: a GPU index (``0``, ``"cuda:1"``),
``"cpu"`` (weights in host memory, moved to the execution device for each forward by accelerate's
``AlignDevicesHook``) or ``"disk"`` (weights read from the checkpoint's safetensors, or an offload
folder, for each forward). This module turns ``--device-map`` into such a map without loading any
weight, and loads the LRM with it:

* :func:`parse_device_map`: ``auto`` / ``balanced`` / ``balanced_low_0`` / ``sequential`` (accelerate's
  strategies), ``cpu`` (``{"": "cpu"}``), a JSON object, or the path of a JSON file; every device is
  checked here (an int ≥ 0, ``cpu``, ``disk``, ``cuda``, ``cuda:N``, ``mps``, ``xpu[:N]``);
* :func:`parse_max_memory`: ``--max-memory`` (JSON object or file: ``{"0": "70GiB", "cpu": "200GiB"}``);
* :func:`resolve_device_map`: a strategy through accelerate's ``infer_auto_device_map`` (with
  ``get_balanced_memory`` for the balanced ones) on the LRM's ``meta`` skeleton (built under
  ``accelerate.init_empty_weights`` by the pre-flight), decoder layers never split
  (``model._no_split_modules``); an explicit map checked against the skeleton: every key a module
  name, every weight covered (the first unknown or uncovered name is the error);
* :func:`check_available`: every GPU the map names exists here (a dry run skips this);
* :func:`load_dispatched`: ``AutoModelForCausalLM.from_pretrained(dtype=, device_map=, offload_folder=)``
  (transformers hands the map to accelerate's ``dispatch_model``);
* :func:`execution_device`: where a (possibly hooked) module computes: its ``AlignDevicesHook``'s
  ``execution_device``, else the device of its first parameter;
* :func:`onloaded`: an offloaded module's weights loaded for a block (``align_module_device``).

The build never moves a dispatched LRM (``--device`` is then only where the projection runs), so
``--sequential`` (which moves one decoder layer at a time to ``--device``) is refused with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BuildError

__all__ = ["STRATEGIES", "check_available", "check_device_map", "execution_device", "format_device_map",
           "is_dispatched", "load_dispatched", "map_source", "onloaded", "parse_device_map", "parse_max_memory",
           "resolve_device_map"]

#: accelerate's placement strategies (what ``from_pretrained(device_map=...)`` accepts as a string)
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

_DEVICE = re.compile(r"^(cpu|disk|cuda|mps|xpu|npu|cuda:\d+|xpu:\d+|npu:\d+)$")

DeviceMap = dict[str, int | str]


def _json_or_file(spec: str, field: str, what: str) -> Any:
    """A JSON object given inline (starts with ``{``) or as a file path."""
    text, where = spec, f"--{field.replace('_', '-')}"
    if not spec.lstrip().startswith("{"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise BuildError(f"{where} {spec!r}: not {what}, a JSON object or a JSON file (no such file)", field=field)
        try:
            text = path.read_text()
        except OSError as e:
            raise BuildError(f"{where} {path}: cannot read it ({e})", field=field) from None
        where = f"{where} file {path}"
    try:
        data = json.loads(text)
    except ValueError as e:
        raise BuildError(f"{where}: not valid JSON ({e})", field=field) from None
    if not isinstance(data, dict) or not data:
        raise BuildError(f"{where}: must be a non-empty JSON object {{name: device}}", field=field)
    return data, where


def _device(value: Any, key: str, where: str, field: str) -> int | str:
    """One device of a map: an int ≥ 0 (a GPU index), or a device name; a digit string is an int."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BuildError(f"{where}: {key!r} → {value!r} is not a device (a GPU index, 'cpu', 'disk', 'cuda:N')",
                         field=field)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise BuildError(f"{where}: {key!r} → {value} is not a device (GPU indices are ≥ 0)", field=field)
        return value
    if not _DEVICE.match(value):
        raise BuildError(f"{where}: {key!r} → {value!r} is not a device (a GPU index, 'cpu', 'disk', 'cuda', "
                         "'cuda:N', 'mps', 'xpu:N')", field=field)
    return value


def parse_device_map(spec: str | Mapping | None) -> str | DeviceMap | None:
    """``--device-map`` → a strategy name (:data:`STRATEGIES`) or ``{module name: device}``; None stays None.
    Module names are checked later, against the LRM's skeleton (:func:`check_device_map`)."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        data, where = dict(spec), "--device-map"
    else:
        s = str(spec).strip()
        if s in STRATEGIES:
            return s
        if s == "cpu":
            return {"": "cpu"}
        data, where = _json_or_file(s, "device_map", f"one of {', '.join(STRATEGIES)} or cpu")
    return {str(k): _device(v, str(k), where, "device_map") for k, v in data.items()}


def parse_max_memory(spec: str | Mapping | None) -> dict[int | str, int | str] | None:
    """``--max-memory`` → ``{device: size}`` as accelerate takes it (GPU keys as ints; sizes as bytes
    or strings such as ``"70GiB"``); None stays None."""
    if spec is None:
        return None
    data, where = (dict(spec), "--max-memory") if isinstance(spec, Mapping) else \
        _json_or_file(str(spec), "max_memory", "a size table")
    out: dict[int | str, int | str] = {}
    for k, v in data.items():
        dev = _device(k, str(k), where, "max_memory")
        if dev == "disk":
            raise BuildError(f"{where}: 'disk' takes no memory limit (what does not fit elsewhere goes there)",
                             field="max_memory")
        if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, str) and not _size_ok(v)):
            raise BuildError(f"{where}: {k!r} → {v!r} is not a size (bytes, or e.g. '70GiB', '500MB')",
                             field="max_memory")
        out[dev] = v
    return out


def _size_ok(s: str) -> bool:
    return re.match(r"^\s*\d+(\.\d+)?\s*([KMGT]i?B|B)?\s*$", s, re.IGNORECASE) is not None


def check_device_map(device_map: DeviceMap, skeleton: nn.Module, where: str = "--device-map") -> None:
    """Every key of ``device_map`` is a module of ``skeleton`` (``""`` = the whole model) and every
    weight and buffer is covered; the error names the first unknown module (with the model's
    top-level names as a hint) or the first uncovered tensor."""
    names = dict(skeleton.named_modules())
    bad = [k for k in device_map if k != "" and k not in names]
    if bad:
        top = sorted({n.split(".layers.")[0] + (".layers.N" if ".layers." in n else "")
                      for n in names if n and n.count(".") <= 2})
        raise BuildError(f"{where}: {bad[0]!r} is not a module of the LRM (modules include {top[:12]})",
                         field="device_map")
    if "" in device_map:
        if len(device_map) > 1:
            raise BuildError(f"{where}: '' (the whole model) cannot be combined with other entries",
                             field="device_map")
        return
    keys = sorted(device_map)
    for tensor in skeleton.state_dict():
        if not any(tensor == k or tensor.startswith(k + ".") for k in keys):
            raise BuildError(f"{where}: no device for {tensor!r} (add its module, e.g. "
                             f"{tensor.rsplit('.', 1)[0]!r}, or a parent of it)", field="device_map")


def map_source(spec: Any) -> str:
    """How errors name a ``--device-map``: ``--device-map file PATH`` for a file, else ``--device-map``."""
    s = str(spec).strip() if isinstance(spec, (str, Path)) else ""
    if s and not s.startswith("{") and s not in STRATEGIES and s != "cpu":
        return f"--device-map file {Path(s).expanduser()}"
    return "--device-map"


def resolve_device_map(spec: str | DeviceMap, skeleton: nn.Module, *, dtype: torch.dtype,
                       max_memory: dict | None = None, where: str = "--device-map") -> DeviceMap:
    """A concrete ``{module: device}`` for this machine from ``spec``, on the ``meta`` skeleton (no
    weights). A strategy goes through ``accelerate.infer_auto_device_map`` (``balanced*`` first through
    ``get_balanced_memory``); an explicit map is checked (:func:`check_device_map`) and returned."""
    if isinstance(spec, dict):
        check_device_map(spec, skeleton, where)
        return dict(spec)
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = sorted(getattr(skeleton, "_no_split_modules", None) or [])
    if spec in ("balanced", "balanced_low_0"):
        max_memory = get_balanced_memory(skeleton, max_memory=max_memory, no_split_module_classes=no_split,
                                         dtype=dtype, low_zero=spec == "balanced_low_0")
    return dict(infer_auto_device_map(skeleton, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype))


def check_available(device_map: DeviceMap, where: str = "--device-map") -> None:
    """Every GPU the map names exists on this machine (the error names the first that does not)."""
    n = torch.cuda.device_count()
    for k, d in device_map.items():
        idx = d if isinstance(d, int) else (int(d.split(":")[1]) if isinstance(d, str) and d.startswith("cuda:")
                                            else (0 if d == "cuda" else None))
        if idx is not None and idx >= n:
            raise BuildError(f"{where}: {k or '<whole model>'!r} → {d!r}, but this machine has {n} CUDA "
                             "device(s)", field="device_map")
        if isinstance(d, str) and d.split(":")[0] in ("mps", "xpu", "npu"):
            mod = getattr(torch, d.split(":")[0], None)
            if mod is None or not mod.is_available():
                raise BuildError(f"{where}: {k or '<whole model>'!r} → {d!r} is not available here",
                                 field="device_map")
    if device_map and all(d == "disk" for d in device_map.values()) and not _accelerate_at_least(WHOLE_DISK_ACCELERATE):
        # accelerate < 1.15's dispatch_model refuses it ("Please use the `disk_offload` function instead")
        raise BuildError(f"{where}: every module on 'disk' needs accelerate ≥ {WHOLE_DISK_ACCELERATE} (installed: "
                         f"{_accelerate_version()}); upgrade it, or place at least one module on 'cpu'",
                         field="device_map")


#: the first accelerate whose ``dispatch_model`` takes a map with every module on ``disk``
WHOLE_DISK_ACCELERATE = "1.15"


def _accelerate_version() -> str:
    from importlib.metadata import version

    return version("accelerate")


def _accelerate_at_least(v: str) -> bool:
    from packaging.version import Version

    return Version(_accelerate_version()) >= Version(v)


def load_dispatched(lrm: Any, dtype: torch.dtype, device_map: DeviceMap, offload_folder: str | Path | None
                    ) -> nn.Module:
    """The LRM loaded with ``device_map`` through transformers (which calls accelerate's
    ``dispatch_model``); ``disk`` modules read from the safetensors shards, or from
    ``offload_folder`` when transformers has to write them (a non-safetensors checkpoint)."""
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"dtype": dtype, "device_map": device_map}
    if offload_folder is not None:
        kw["offload_folder"] = str(offload_folder)
    return AutoModelForCausalLM.from_pretrained(str(lrm), **kw)


def _hook_device(hook: Any) -> torch.device | None:
    for h in [hook, *getattr(hook, "hooks", [])]:  # an AlignDevicesHook, or one inside a SequentialHook
        d = getattr(h, "execution_device", None)
        if d is not None:
            return torch.device(d if not isinstance(d, int) else f"cuda:{d}")
    return None


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's ``execution_device`` (the weights of an
    offloaded module are on ``meta`` between forwards), else its first parameter's device, else cpu."""
    hook = getattr(module, "_hf_hook", None)
    d = _hook_device(hook) if hook is not None else None
    if d is not None:
        return d
    p = next(module.parameters(), None)
    return p.device if p is not None and p.device.type != "meta" else torch.device("cpu")


@contextmanager
def onloaded(module: nn.Module | None) -> Iterator[None]:
    """For the block, an offloaded ``module``'s own weights loaded onto its execution device
    (``accelerate.utils.align_module_device``: its hook's ``pre_forward`` / ``post_forward``), so code
    that reads ``module.weight`` (the feature cache's embedding fingerprint) sees values, not ``meta``;
    a module that is not offloaded (or None) is left alone."""
    if module is None or getattr(module, "_hf_hook", None) is None:
        yield
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield


def is_dispatched(model: nn.Module) -> bool:
    """Whether ``model`` was loaded with a device map (transformers records it as ``hf_device_map``)."""
    return getattr(model, "hf_device_map", None) is not None


def format_device_map(device_map: Mapping[str, int | str]) -> str:
    """One line per run of consecutive decoder layers on one device, e.g.
    ``model.layers.0-13 → 0``; other modules one line each."""
    lines: list[str] = []
    run: tuple[str, int, int, Any] | None = None  # (prefix, first, last, device)
    pat = re.compile(r"^(.*\.layers)\.(\d+)$")

    def flush() -> None:
        if run is not None:
            p, a, b, d = run
            lines.append(f"  {p}.{a}{'-' + str(b) if b != a else ''} → {d}")

    for k, d in device_map.items():
        m = pat.match(k)
        if m and run is not None and run[0] == m.group(1) and run[3] == d and int(m.group(2)) == run[2] + 1:
            run = (run[0], run[1], int(m.group(2)), d)
            continue
        flush()
        run = None
        if m:
            run = (m.group(1), int(m.group(2)), int(m.group(2)), d)
        else:
            lines.append(f"  {k or '<whole model>'} → {d}")
    flush()
    return "\n".join(lines)
