"""``rain plan --device-map``: where a dispatched LRM's weights sit, by arithmetic (docs/DESIGN.md §5.6, §5.8).

The LRM is cut into the blocks accelerate places (decoder layers are never split): the input
embedding ``V·h``, each decoder layer ``P_L + 2h`` (its seven linears and two norms), the final norm
``h`` and ``lm_head`` ``V·h`` (0 when tied: it shares the embedding), times the dtype's bytes; a
decoder layer's sub-modules (``self_attn`` = q, k, v, o; ``mlp`` = gate, up, down; the two norms;
each ``*_proj``) can be placed one by one by an explicit map. Biases are not counted (< 0.1 %).

* an explicit map ``{module: device}``: each leaf goes to the device of the longest key that is it or
  a parent of it; a key naming no module, or a leaf no key covers, is a :class:`PlanError` naming it;
* a strategy (``auto`` / ``sequential`` / ``balanced`` / ``balanced_low_0``): the blocks in model
  order fill the GPUs in index order, each up to its ``--max-memory`` (default: the profile's
  device memory for one GPU ``0``), then ``cpu`` (``--max-memory`` ``cpu``, default unlimited), then
  ``disk`` — accelerate's ``infer_auto_device_map`` greedy order. ``balanced`` caps each GPU at the
  total over the GPUs' count (plus one layer), as ``get_balanced_memory`` does; ``balanced_low_0``
  also keeps GPU 0 to one layer. Unlike accelerate, no room is reserved on GPU 0 for offloaded layers;
  ``rain build --dry-run`` prints accelerate's own map for this machine.

What a forward costs beyond the one-device case: with a GPU in the map, ``cpu`` blocks move over the
host link and ``disk`` blocks are read from disk and moved, once per forward call (accelerate loads an
offloaded module's weights for each call); without one, ``disk`` blocks are read from disk per call.
Naive pipeline (one GPU computes at a time): the FLOP time is one GPU's, not divided by their number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

GiB = 2**30
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class PlacementError(ValueError):
    """A device map or memory table the plan cannot place; the message names the module / device."""


def size_bytes(value: int | float | str, what: str) -> float:
    """``70GiB`` / ``500MB`` / a number of bytes → bytes (GB = 10⁹, GiB = 2³⁰, as accelerate reads them)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b)?\s*$", str(value), re.IGNORECASE)
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise PlacementError(f"{what}: {value!r} is not a size (bytes, or e.g. '70GiB', '500MB')")
    return float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]


def leaves(m: Any, dbytes: int) -> dict[str, float]:
    """``{leaf module name: bytes}`` in model order for a ``plan.ModelShape`` in a dtype of ``dbytes``."""
    h, v = m.hidden, m.vocab
    out: dict[str, float] = {"model.embed_tokens": float(v * h * dbytes)}
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    for i in range(m.layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm"] = float(h * dbytes)
        for role, o, n in m.modules():
            out[f"{p}.{names[role]}"] = float(o * n * dbytes)
        out[f"{p}.post_attention_layernorm"] = float(h * dbytes)
    out["model.norm"] = float(h * dbytes)
    out["lm_head"] = 0.0 if m.tied else float(v * h * dbytes)
    return out


def blocks(m: Any, dbytes: int) -> dict[str, float]:
    """The blocks a strategy places whole: embedding, each decoder layer, final norm, lm_head."""
    out: dict[str, float] = {}
    for name, b in leaves(m, dbytes).items():
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        out[key] = out.get(key, 0.0) + b
    return out


def _device_key(d: Any) -> str:
    return str(d)


@dataclass
class Placement:
    """``bytes_by_device``: weights per device (keys ``"0"``, ``"1"``, ``"cpu"``, ``"disk"``);
    ``device_map``: the map as placed (blocks or the given keys); ``gpus``: the GPU keys in use;
    ``largest_block``: the largest block (an offloaded one is brought to GPU 0 while it runs)."""

    device_map: dict[str, Any]
    bytes_by_device: dict[str, float] = field(default_factory=dict)
    largest_block: float = 0.0
    #: per GPU, the peak over the build's stages (weights, Stage 2's deltas, working set); set by ``plan``
    need: dict[str, float] = field(default_factory=dict)

    @property
    def gpus(self) -> list[str]:
        return [d for d in self.bytes_by_device if d not in ("cpu", "disk")]

    def on(self, device: str) -> float:
        return self.bytes_by_device.get(device, 0.0)

    @property
    def offloaded(self) -> float:
        """Bytes moved to an execution device for every forward call (``cpu`` with a GPU, and ``disk``)."""
        return (self.on("cpu") if self.gpus else 0.0) + self.on("disk")

    def streamed_seconds(self, link_gbps: float, disk_gbps: float) -> float:
        """Seconds per forward call to bring the offloaded weights to where they run."""
        t = self.on("disk") / (disk_gbps * 1e9)
        if self.gpus:
            t += (self.on("cpu") + self.on("disk")) / (link_gbps * 1e9)
        return t

    def summary(self) -> str:
        parts = [f"{'GPU ' + d if d not in ('cpu', 'disk') else d} {b / GiB:.2f} GiB"
                 for d, b in self.bytes_by_device.items() if b > 0 or d not in ("cpu", "disk")]
        return ", ".join(parts)


def _explicit(m: Any, dbytes: int, device_map: dict[str, Any]) -> Placement:
    lv = leaves(m, dbytes)
    parents = {".".join(n.split(".")[:k]) for n in lv for k in range(1, n.count(".") + 2)}
    known = parents | {"model.rotary_emb", "model", ""}
    for k in device_map:
        if k not in known:
            raise PlacementError(f"--device-map: {k!r} is not a module of the model (it has model.embed_tokens, "
                                 f"model.layers.0-{m.layers - 1}, model.norm, lm_head)")
    if "" in device_map:
        if len(device_map) > 1:
            raise PlacementError("--device-map: '' (the whole model) cannot be combined with other entries")
        d = _device_key(device_map[""])
        return Placement(dict(device_map), {d: sum(lv.values())}, max(blocks(m, dbytes).values()))
    by_dev: dict[str, float] = {}
    keys = sorted(device_map, key=len, reverse=True)
    for name, b in lv.items():
        k = next((k for k in keys if name == k or name.startswith(k + ".")), None)
        if k is None:
            raise PlacementError(f"--device-map: no device for {name!r} (add it or a parent of it)")
        d = _device_key(device_map[k])
        by_dev[d] = by_dev.get(d, 0.0) + b
    return Placement(dict(device_map), _ordered(by_dev), max(blocks(m, dbytes).values()))


def _ordered(by_dev: dict[str, float]) -> dict[str, float]:
    gpus = sorted((d for d in by_dev if d not in ("cpu", "disk")), key=lambda d: (not d.isdigit(), d))
    return {d: by_dev[d] for d in [*gpus, "cpu", "disk"] if d in by_dev}


def _strategy(m: Any, dbytes: int, strategy: str, max_memory: dict[str, Any] | None, gpu_memory_gib: float | None
              ) -> Placement:
    bl = blocks(m, dbytes)
    caps = {_device_key(k): size_bytes(v, f"--max-memory {k}") for k, v in (max_memory or {}).items()}
    gpus = sorted((d for d in caps if d not in ("cpu", "disk")), key=lambda d: (not d.isdigit(), d))
    if not max_memory and gpu_memory_gib:
        gpus, caps = ["0"], {"0": gpu_memory_gib * GiB}
    largest = max(bl.values())
    if strategy in ("balanced", "balanced_low_0") and gpus:
        share = sum(bl.values()) / max(len(gpus) - (1 if strategy == "balanced_low_0" else 0), 1) + largest
        for i, g in enumerate(gpus):
            caps[g] = min(caps[g], largest if strategy == "balanced_low_0" and i == 0 and len(gpus) > 1 else share)
    order = [*gpus, "cpu", "disk"]
    cap = {d: caps.get(d, float("inf")) for d in order}
    cap["disk"] = float("inf")
    used = {d: 0.0 for d in order}
    dm: dict[str, Any] = {}
    i = 0
    for name, b in bl.items():
        while used[order[i]] + b > cap[order[i]]:
            i += 1
        used[order[i]] += b
        dm[name] = int(order[i]) if order[i].isdigit() else order[i]
    return Placement(dm, _ordered({d: u for d, u in used.items() if u > 0 or d in gpus}), largest)


def place(m: Any, dtype_bytes: int, device_map: str | dict[str, Any], max_memory: dict[str, Any] | None = None,
          gpu_memory_gib: float | None = None) -> Placement:
    """Where the LRM's weights go (see the module docstring)."""
    if isinstance(device_map, dict):
        return _explicit(m, dtype_bytes, device_map)
    return _strategy(m, dtype_bytes, device_map, max_memory, gpu_memory_gib)
